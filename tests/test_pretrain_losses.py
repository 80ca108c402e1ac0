"""ITM negative sampling, MLM, box and ITC losses on hand-made inputs."""
import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.losses import (box_losses, itc_loss, itm_loss, mlm_loss, same_text, sample_hard_negatives,
                             select_masked_positions)


def test_itm_sampler_never_picks_the_positive():
    torch.manual_seed(0)
    sim = torch.randn(6, 6) * 5
    sim.fill_diagonal_(100.0)                 # the positive is by far the most similar
    picks = torch.stack([sample_hard_negatives(sim)[0] for _ in range(200)])
    assert picks.shape == (200, 6)
    assert not (picks == torch.arange(6)).any()
    assert set(picks.flatten().tolist()) == set(range(6))


def test_itm_sampler_follows_one_hot_off_diagonal():
    b = 5
    target = torch.tensor([3, 0, 4, 1, 2])
    sim = torch.full((b, b), -1e4)
    sim[torch.arange(b), target] = 1e4        # softmax puts (nearly) all weight there; +1e-5 elsewhere
    sim.fill_diagonal_(1e4)                   # even a maximal positive is excluded
    hits = torch.stack([sample_hard_negatives(sim)[0] for _ in range(50)])
    assert (hits == target).float().mean() > 0.98


def test_itm_sampler_survives_nan_and_inf():
    sim = torch.randn(4, 4)
    sim[0] = float("nan")
    sim[1, 2] = float("inf")
    sim[2] = float("-inf")
    idx, ok = sample_hard_negatives(sim)
    assert idx.shape == (4,)
    assert ok.tolist() == [False, False, False, True]   # non-finite rows: drawn uniformly, flagged
    assert ((idx >= 0) & (idx < 4)).all()
    assert not (idx == torch.arange(4)).any()
    with pytest.raises(ValueError):
        sample_hard_negatives(torch.randn(1, 1))


def test_itm_loss_labels_and_accuracy():
    logits = torch.tensor([[0.0, 5.0], [0.0, 5.0], [5.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    loss, acc = itm_loss(logits, num_pos=2)   # 2 positives then 4 negatives; one negative misjudged
    assert acc.item() == pytest.approx(5 / 6)
    expected = F.cross_entropy(logits, torch.tensor([1, 1, 0, 0, 0, 0]))
    assert loss.item() == pytest.approx(expected.item())


def test_mlm_loss_only_on_masked_positions_and_ignores_padding():
    torch.manual_seed(0)
    labels = torch.full((2, 6), -100)
    labels[0, 2], labels[1, 1] = 7, 3
    logits = torch.randn(2, 6, 10)
    loss, _ = mlm_loss(logits, labels)
    ref = (F.cross_entropy(logits[0, 2:3], labels[0, 2:3]) + F.cross_entropy(logits[1, 1:2], labels[1, 1:2])) / 2
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    changed = logits.clone()
    changed[0, [0, 1, 3, 4, 5]] = torch.randn(5, 10) * 100    # unmasked tokens and padding
    changed[1, 4:] = float("nan")                             # even garbage at padded positions
    assert mlm_loss(changed, labels)[0].item() == pytest.approx(loss.item(), rel=1e-6)
    none = torch.full((2, 6), -100)
    assert mlm_loss(logits, none)[0].item() == 0.0


def test_select_masked_positions_fixed_shape():
    labels = torch.full((3, 8), -100)
    labels[0, [1, 5]] = 4
    labels[2, [1, 2, 3, 4]] = 9
    pos, lab, overflow = select_masked_positions(labels, 3)
    assert pos.shape == lab.shape == (3, 3)
    assert sorted(pos[0][lab[0] != -100].tolist()) == [1, 5]
    assert (lab[1] == -100).all()
    assert (lab[2] != -100).sum() == 3
    assert overflow.item() == pytest.approx(1 / 3)


def test_box_losses_hand_values():
    target = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    l1, giou = box_losses(target.clone(), target)
    assert l1.item() == 0 and giou.item() == pytest.approx(0, abs=1e-6)
    pred = torch.tensor([[0.5, 0.5, 0.4, 0.4]])               # nested: iou 0.25, hull = pred
    l1, giou = box_losses(pred, target)
    assert l1.item() == pytest.approx(0.4) and giou.item() == pytest.approx(0.75)


def test_itc_single_process_matches_formula():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    temp = torch.tensor([0.07])
    loss, l_i2t, l_t2i = itc_loss(img, txt, temp)
    logits = img @ txt.t() / 0.07
    ref = (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.t(), torch.arange(4))) / 2
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(l_i2t, logits) and torch.allclose(l_t2i, logits.t())
    perfect = itc_loss(img, img, torch.tensor([0.001]))[0]
    assert perfect.item() < 1e-3 and math.isfinite(perfect.item())


def test_itm_sampler_skips_padding_repeats():
    sim = torch.zeros(5, 5)
    valid = torch.tensor([True, True, True, False, False])     # rows 3, 4 repeat rows 0, 1
    picks = torch.stack([sample_hard_negatives(sim, valid)[0] for _ in range(100)])
    assert (picks < 3).all() and not (picks == torch.arange(5)).any()
    idx, ok = sample_hard_negatives(sim, torch.tensor([True, False, False, False, False]))
    assert not ok[0] and idx[0] != 0          # nothing usable for row 0: flagged, still not the positive


def test_itc_ignores_padding_repeats():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(3, 8), dim=-1), F.normalize(torch.randn(3, 8), dim=-1)
    temp = torch.tensor([0.1])
    ref = itc_loss(img, txt, temp)[0]
    rep = torch.tensor([0, 1, 2, 0, 1])                 # the loader's cyclic fill to 5
    valid = torch.arange(5) < 3
    got = itc_loss(img[rep], txt[rep], temp, valid)[0]
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    # aligned pairs: masked repeats leave a perfect score; unmasked, each duplicate is a false negative
    low = torch.tensor([0.01])
    assert itc_loss(img[rep], img[rep], low, valid)[0].item() < 1e-3
    assert itc_loss(img[rep], img[rep], low)[0].item() > 0.5 * math.log(2)


def test_identical_texts_are_not_negatives():
    ids = torch.tensor([[101, 7, 9, 102, 0], [101, 7, 9, 102, 0], [101, 7, 102, 0, 0], [101, 9, 7, 102, 0]])
    dup = same_text(ids)
    assert dup.tolist() == [[True, True, False, False], [True, True, False, False],
                            [False, False, True, False], [False, False, False, True]]
    # ITC: texts 0 and 1 are the same caption of two matching images; their cross terms leave the softmax
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    txt[1] = txt[0]
    temp = torch.tensor([0.1])
    logits = img @ txt.t() / 0.1
    keep = ~dup | torch.eye(4, dtype=torch.bool)
    ref = (F.cross_entropy(logits.masked_fill(~keep, float("-inf")), torch.arange(4))
           + F.cross_entropy(logits.t().masked_fill(~keep, float("-inf")), torch.arange(4))) / 2
    got = itc_loss(img, txt, temp, duplicate=dup)[0]
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    assert got.item() < itc_loss(img, txt, temp)[0].item()       # counted as negatives they only add loss
    # with padding repeats as well: row 4 repeats row 2 (valid False)
    rep = torch.tensor([0, 1, 2, 3, 2])
    valid = torch.arange(5) < 4
    both = itc_loss(img[rep], txt[rep], temp, valid, same_text(ids[rep]))[0]
    assert both.item() == pytest.approx(ref.item(), rel=1e-5)
    # ITM: a duplicate is never drawn as the hard negative, even when it is by far the most similar
    sim = torch.zeros(4, 4)
    sim[0, 1] = sim[1, 0] = 1e4
    picks = torch.stack([sample_hard_negatives(sim, None, dup)[0] for _ in range(100)])
    assert not (picks[:, :2] < 2).any() and not (picks == torch.arange(4)).any()
    idx, ok = sample_hard_negatives(sim[:2, :2], None, dup[:2, :2])
    assert not ok.any()                                          # nothing but duplicates: flagged, left out


def test_itm_and_box_losses_weighted():
    logits = torch.tensor([[0.0, 5.0], [5.0, 0.0], [0.0, 5.0]])
    _, acc = itm_loss(logits, 1, torch.tensor([1.0, 1.0, 0.0]))
    assert acc.item() == 1.0
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]])
    l1, giou = box_losses(pred, pred[[0, 0]], torch.tensor([True, False]))
    assert l1.item() == 0 and giou.item() == pytest.approx(0, abs=1e-6)
