"""AttBalance's region attention constraint on the LAP map (finetune/attbalance.py)."""
from __future__ import annotations

import torch

from finetune.attbalance import box_cell_coverage, rac_loss
from finetune.task import build_task
from finetune_helpers import tiny_batch, tiny_config


def test_coverage_marks_whole_half_and_no_cells():
    # a 4x4 grid; the box spans x in [0.25, 0.625] (cell 1 whole, cell 2 half) and y in [0, 0.25] (row 0)
    box = torch.tensor([[(0.25 + 0.625) / 2, 0.125, 0.375, 0.25]])
    m = box_cell_coverage(box, (4, 4)).view(4, 4)
    expected = torch.zeros(4, 4)
    expected[0, 1], expected[0, 2] = 1.0, 0.5
    assert torch.allclose(m, expected, atol=1e-6)


def test_coverage_sums_to_box_area_in_cells():
    g = torch.Generator().manual_seed(0)
    cxcy = torch.rand(16, 2, generator=g) * 0.5 + 0.25
    wh = torch.rand(16, 2, generator=g) * 0.4 + 0.05
    boxes = torch.cat([cxcy, wh], 1)
    m = box_cell_coverage(boxes, (6, 8))
    assert torch.allclose(m.sum(-1), wh[:, 0] * wh[:, 1] * 48, atol=1e-4)
    assert (m >= 0).all() and (m <= 1 + 1e-6).all()


def test_rac_is_small_inside_and_large_outside():
    box = torch.tensor([[0.375, 0.375, 0.25, 0.25]])                # exactly cell (1, 1) of a 4x4 grid
    inside = torch.zeros(1, 16)
    inside[0, 5] = 1.0
    outside = torch.zeros(1, 16)
    outside[0, 15] = 1.0
    uniform = torch.full((1, 16), 1 / 16)
    lo, mid, hi = (rac_loss(a, box, (4, 4)).item() for a in (inside, uniform, outside))
    assert lo < 1e-4 < mid < hi
    assert abs(mid - 2 * torch.log(torch.tensor(16.0)).item()) < 1e-3   # -log(1/16) twice


def test_rac_gradient_moves_attention_into_the_box():
    box = torch.tensor([[0.375, 0.375, 0.25, 0.25]])
    logits = torch.zeros(1, 16, requires_grad=True)
    rac_loss(logits.softmax(-1), box, (4, 4)).backward()
    assert logits.grad[0, 5] < 0 and (logits.grad[0, torch.arange(16) != 5] > 0).all()


def test_task_adds_weighted_rac_term_only_when_configured():
    torch.manual_seed(0)
    batch = tiny_batch(n=3)
    off = build_task(tiny_config(**{"model.mask_grounding.enabled": False}))(batch)
    assert "rac" not in off
    torch.manual_seed(0)
    task = build_task(tiny_config(**{"model.mask_grounding.enabled": False, "loss.rac": 2.0}))
    on = task(batch)
    assert torch.isfinite(on["rac"]) and on["rac"] > 0
    assert torch.allclose(on["loss"], off["loss"] + 2.0 * on["rac"], atol=1e-5)


def test_attention_geometry_moments():
    from finetune.heads import attention_geometry
    one = torch.zeros(2, 4 * 8)
    one[0, 1 * 8 + 6] = 1.0                                       # row 1, column 6 of a 4x8 grid
    one[1] = 1.0 / 32                                             # uniform
    g = attention_geometry(one, (4, 8))
    assert torch.allclose(g[0], torch.tensor([6.5 / 8, 1.5 / 4, 0.0, 0.0]), atol=2e-3)
    # a uniform map: centre 0.5, std of the cell centres ((k^2 - 1) / 12)^0.5 / k
    assert torch.allclose(g[1], torch.tensor([0.5, 0.5, (63 / 12) ** 0.5 / 8, (15 / 12) ** 0.5 / 4]), atol=1e-4)


def test_geometry_head_reads_where_the_lap_map_points():
    from finetune.heads import RecHead
    torch.manual_seed(0)
    head = RecHead(8, 8, k=4, hidden=16, geometry=True)
    visual = torch.zeros(1, 16, 8)                                 # identical tokens: only geometry differs
    visual[0, 5, 0] = 50.0                                         # a key the query will pick out
    cls = torch.zeros(1, 8)
    with torch.no_grad():
        head.pool.key.weight.zero_()
        head.pool.key.weight[0, 0] = 1.0
        head.pool.query.weight.zero_()
        head.pool.query.bias.copy_(torch.tensor([1.0, 0, 0, 0]))
    box_a, attn = head(visual, cls, (4, 4))
    assert attn[0].argmax() == 5
    visual2 = torch.zeros(1, 16, 8)
    visual2[0, 10, 0] = 50.0
    box_b, _ = head(visual2, cls, (4, 4))
    assert not torch.allclose(box_a, box_b)                        # same pooled value, other place, other box
    assert RecHead(8, 8, k=4, hidden=16).mlp[0].in_features == 8
