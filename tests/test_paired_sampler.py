"""data.paired: consecutive training items are two expressions on one image naming different objects."""
import pytest

from shards.paired_sampler import PairedExpressionSampler

# image 0: objects 5 (two expressions) and 6; image 1: object 7 only (two expressions); image 2: objects 8, 9, 10
ITEMS = [(0, 5), (0, 5), (0, 6), (1, 7), (1, 7), (2, 8), (2, 9), (2, 10)]


def test_pairs_share_the_image_and_differ_in_target_where_possible():
    s = PairedExpressionSampler(ITEMS, rank=0, world_size=1, seed=3)
    for epoch in range(5):
        s.set_epoch(epoch)
        order = list(s)
        assert len(order) == len(s) == 8
        for a, b in zip(order[0::2], order[1::2]):
            assert ITEMS[a][0] == ITEMS[b][0]                     # same image
            if ITEMS[a][0] == 1:                                  # one object: the other expression for it
                assert a != b and ITEMS[b][1] == 7
            else:
                assert ITEMS[a][1] != ITEMS[b][1]


def test_order_is_a_function_of_seed_and_epoch():
    a = PairedExpressionSampler(ITEMS, rank=0, world_size=1, seed=1)
    b = PairedExpressionSampler(ITEMS, rank=0, world_size=1, seed=1)
    a.set_epoch(2), b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b) or list(a) != list(PairedExpressionSampler(ITEMS, rank=0, world_size=1, seed=2))


def test_ranks_get_disjoint_anchors_and_equal_lengths():
    ranks = [PairedExpressionSampler(ITEMS, rank=r, world_size=3, seed=0) for r in range(3)]
    orders = [list(s) for s in ranks]
    assert {len(o) for o in orders} == {2}                        # (8 // 2) // 3 = 1 pair each
    anchors = [o[0] for o in orders]
    assert len(set(anchors)) == 3
    with pytest.raises(ValueError, match="outside world size"):
        PairedExpressionSampler(ITEMS, rank=3, world_size=3)


def test_paired_needs_an_even_batch():
    from finetune.config import GroundingDataConfig
    from pretrain.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="data.paired needs an even data.batch_size"):
        from_dict(GroundingDataConfig, {"paired": True, "batch_size": 7}, prefix="data.")
