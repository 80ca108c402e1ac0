"""The multi-instance head's matcher (against brute force over every permutation), its losses on hand-made
cases, and the head's shapes."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from finetune.matcher import hungarian_match, match_cost
from finetune.mdetr_losses import contrastive_align, mdetr_losses, positive_token_map

SPECIAL = (0, 101, 102)


def _brute(cost: np.ndarray, k: int) -> float:
    Q = cost.shape[0]
    return min(sum(cost[q, t] for t, q in enumerate(perm)) for perm in itertools.permutations(range(Q), k))


@pytest.mark.parametrize("seed", range(6))
def test_matcher_against_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    B, Q, K, L = 3, 5, 4, 6
    pred = torch.rand(B, Q, 4, generator=g) * 0.5 + 0.2
    prob = torch.rand(B, Q, L + 1, generator=g).softmax(-1)
    tgt = torch.rand(B, K, 4, generator=g) * 0.5 + 0.2
    pos = torch.rand(B, K, L, generator=g)
    n = torch.tensor([0, 2, 4]) if seed % 2 else torch.tensor([3, 1, 4])
    cost = match_cost(pred, prob, tgt, pos)
    b, q, t = hungarian_match(cost, n)
    c = cost.numpy()
    for s in range(B):
        sel = b == s
        assert sel.sum() == n[s] and sorted(t[sel].tolist()) == list(range(int(n[s])))
        assert len(set(q[sel].tolist())) == int(n[s])                      # one query per target
        got = float(c[s, q[sel], t[sel]].sum())
        assert got == pytest.approx(_brute(c[s], int(n[s])), abs=1e-5)


def test_match_cost_terms():
    """One sample, two queries, one target: the cost is exactly the sum of the weighted terms."""
    pred = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2]]])
    tgt = torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])
    prob = torch.tensor([[[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]])
    pos = torch.tensor([[[1.0, 0.0]]])
    c = match_cost(pred, prob, tgt, pos, cost_token=1.0, cost_l1=5.0, cost_giou=2.0)
    assert c[0, 0, 0].item() == pytest.approx(-0.5 + 0.0 - 2.0)
    # query 1: L1 = 0.6; boxes [0.1,0.1,0.3,0.3] vs [0.4,0.4,0.6,0.6]: IoU 0, hull 0.25, union 0.08
    giou = 0.0 - (0.25 - 0.08) / 0.25
    assert c[0, 1, 0].item() == pytest.approx(5 * 0.6 - 2 * giou, abs=1e-5)


def _out(B=2, Q=3, L=5, S=8, boxes=None, logits=None):
    torch.manual_seed(0)
    return {"pred_boxes": boxes if boxes is not None else torch.full((B, Q, 4), 0.3),
            "pred_logits": logits if logits is not None else torch.zeros(B, Q, L + 1),
            "query_align": torch.nn.functional.normalize(torch.randn(B, Q, 4), dim=-1),
            "token_align": torch.nn.functional.normalize(torch.randn(B, L, 4), dim=-1),
            "pred_masks": torch.zeros(B, Q, S // 4, S // 4)}


def test_positive_token_map():
    ids = torch.tensor([[101, 7, 8, 102, 0], [101, 102, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    pos = positive_token_map(ids, mask, SPECIAL)
    assert torch.allclose(pos[0], torch.tensor([0, 0.5, 0.5, 0, 0]))
    assert torch.allclose(pos[1], torch.tensor([1.0, 0, 0, 0, 0]))       # nothing but specials: [CLS]


def test_no_target_trains_every_query_towards_no_object():
    B, Q, L, S = 1, 3, 5, 8
    batch = {"text_ids": torch.tensor([[101, 7, 8, 102, 0]]), "text_mask": torch.tensor([[1, 1, 1, 1, 0]]),
             "boxes": torch.zeros(B, 2, 4), "n_targets": torch.tensor([0]), "target_masks": torch.zeros(B, 2, S, S)}
    logits = torch.zeros(B, Q, L + 1, requires_grad=True)
    t = mdetr_losses(_out(B, Q, L, S, logits=logits), batch, special_ids=SPECIAL)
    assert t["l1"].item() == t["giou"].item() == t["align"].item() == t["focal"].item() == t["dice"].item() == 0.0
    # uniform over 4 valid tokens + no-object (the padding position sits at -1e4 only inside the head, here 0):
    assert t["token"].item() == pytest.approx(math.log(L + 1))
    t["token"].backward()
    g = logits.grad[0]
    assert (g[:, L] < 0).all() and (g[:, :L] > 0).all()                  # descent raises p(no object) everywhere


def test_matched_losses_by_hand():
    """Two targets, three queries; queries 0 and 2 sit exactly on the targets: zero box loss, and the token
    target of the matched queries is uniform over the two word tokens."""
    B, Q, L, S = 1, 3, 5, 8
    tgt = torch.tensor([[[0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5]]])
    boxes = torch.tensor([[[0.75, 0.75, 0.5, 0.5], [0.5, 0.5, 0.1, 0.1], [0.25, 0.25, 0.5, 0.5]]])
    logits = torch.full((B, Q, L + 1), -20.0)
    logits[0, 0, 1:3] = logits[0, 2, 1:3] = 5.0                            # matched queries: on the words
    logits[0, 1, L] = 5.0                                                  # the spare query: no object
    tm = torch.zeros(B, 2, 2, 2)                   # targets at the masks' own size: the resize is the identity
    tm[0, 0, 0, 0] = 1
    tm[0, 1, 1, 1] = 1
    pm = torch.full((B, Q, 2, 2), -30.0)
    pm[0, 2, 0, 0] = pm[0, 0, 1, 1] = 30.0                                # each matched query: its target's pixel
    batch = {"text_ids": torch.tensor([[101, 7, 8, 102, 0]]), "text_mask": torch.tensor([[1, 1, 1, 1, 0]]),
             "boxes": tgt, "n_targets": torch.tensor([2]), "target_masks": tm}
    out = {**_out(B, Q, L, S, boxes=boxes, logits=logits), "pred_masks": pm}
    t = mdetr_losses(out, batch, special_ids=SPECIAL)
    assert t["l1"].item() == pytest.approx(0.0, abs=1e-6) and t["giou"].item() == pytest.approx(0.0, abs=1e-6)
    # matched queries: CE of softmax([-20, 5, 5, -20, -20, -20]) against [0, .5, .5, 0, 0, 0]
    lse = math.log(2 * math.exp(5.0) + 4 * math.exp(-20.0))
    per_matched = lse - 5.0
    lse_spare = math.log(math.exp(5.0) + 5 * math.exp(-20.0))
    expected = (2 * per_matched + 0.1 * (lse_spare - 5.0)) / (2 + 0.1)
    assert t["token"].item() == pytest.approx(expected, rel=1e-5)
    assert t["dice"].item() == pytest.approx(0.0, abs=1e-6) and t["focal"].item() == pytest.approx(0.0, abs=1e-9)
    out_wrong = {**out, "pred_masks": pm.flip(-1)}                        # each query on a wrong pixel
    # dice per pair: 1 - (2*0 + 1) / (1 + 1 + 1) (eps 1)
    assert mdetr_losses(out_wrong, batch, special_ids=SPECIAL)["dice"].item() == pytest.approx(2 / 3, rel=1e-5)


def test_contrastive_align_by_hand():
    """Two queries, two tokens; query 0 is matched with token 0 as its positive, query 1 is unmatched."""
    qa = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    ta = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    pos = torch.tensor([[[True, False], [False, False]]])
    tau = 0.5                                                # logits [[2, 0], [0, 2]]
    got = contrastive_align(qa, ta, pos, torch.tensor([[1, 1]]), tau, 1)
    a = math.log(1 + math.exp(-2.0))                         # -log softmax at the positive, either direction
    assert got.item() == pytest.approx((a + a) / 2, rel=1e-5)
    masked = contrastive_align(qa, ta, pos, torch.tensor([[1, 0]]), tau, 1)   # token 1 is padding
    assert masked.item() == pytest.approx((0.0 + a) / 2, rel=1e-5)
    assert contrastive_align(qa, ta, pos & False, torch.tensor([[1, 1]]), tau, 0).item() == 0.0   # no target


def test_selection_loss_by_hand():
    """Each token's target is the fraction of its grid cell the targets cover; BCE with logits, mean."""
    from finetune.mdetr_losses import selection_loss

    union = torch.zeros(1, 4, 4)
    union[0, :2, :2] = 1                    # cell (0, 0) of a 2x2 grid fully covered
    union[0, 2:, 2] = 1                     # cell (1, 1) half covered
    scores = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    cover = torch.tensor([1.0, 0.0, 0.0, 0.5])
    p = scores.sigmoid()
    want = -(cover * p.log() + (1 - cover) * (1 - p).log()).mean()
    assert torch.allclose(selection_loss(scores, union, (2, 2)), want)
