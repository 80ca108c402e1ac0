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


def test_reference_box_of_one_cell_and_of_a_uniform_block():
    from finetune.heads import attention_geometry, reference_boxes
    a = torch.zeros(2, 4, 8)
    a[0, 1, 6] = 1.0                                              # one cell: the cell itself
    a[1, 0:2, 2:5] = 1.0 / 6                                      # rows 0-1, columns 2-4, evenly
    ref = reference_boxes(attention_geometry(a.flatten(1), (4, 8)), (4, 8))
    assert torch.allclose(ref[0], torch.tensor([6.5 / 8, 1.5 / 4, 1 / 8, 1 / 4]), atol=1e-4)
    assert torch.allclose(ref[1], torch.tensor([3.5 / 8, 1.0 / 4, 3 / 8, 2 / 4]), atol=1e-4)


def _pointing_head():
    """A geometry head whose LAP map picks the token with a large first channel."""
    from finetune.heads import RecHead
    torch.manual_seed(0)
    head = RecHead(8, 8, k=4, hidden=16, geometry=True)
    with torch.no_grad():
        head.pool.key.weight.zero_()
        head.pool.key.weight[0, 0] = 1.0
        head.pool.query.weight.zero_()
        head.pool.query.bias.copy_(torch.tensor([1.0, 0, 0, 0]))
    return head


def test_geometry_head_starts_at_the_box_the_lap_map_points_to():
    head = _pointing_head()
    cls = torch.zeros(1, 8)
    for cell in (5, 10):                                          # identical pooled value, other place
        visual = torch.zeros(1, 16, 8)
        visual[0, cell, 0] = 50.0
        box, attn = head(visual, cls, (4, 4))
        assert attn[0].argmax() == cell
        r, c = divmod(cell, 4)
        assert torch.allclose(box[0], torch.tensor([(c + 0.5) / 4, (r + 0.5) / 4, 0.25, 0.25]), atol=1e-3)
    from finetune.heads import RecHead
    assert RecHead(8, 8, k=4, hidden=16).mlp[0].in_features == 8    # the paper's head: pooled values only


def test_box_loss_reaches_the_lap_attention_through_the_reference_box():
    from finetune.losses import box_losses
    head = _pointing_head()
    visual = torch.randn(2, 16, 8, requires_grad=True)
    box, _ = head(visual, torch.randn(2, 8), (4, 4))
    terms = box_losses(box, torch.tensor([[0.2, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]]))
    (terms["l1"] + terms["giou"]).backward()
    assert head.pool.key.weight.grad.abs().sum() > 0 and visual.grad.abs().sum() > 0
    assert head.mlp[-1].weight.grad.abs().sum() > 0              # the correction learns from the first step


def test_detached_box_head_trains_itself_but_not_the_backbone():
    from finetune.heads import RecHead
    from finetune.losses import box_losses
    torch.manual_seed(0)
    target = torch.tensor([[0.2, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])
    for detach in (False, True):
        head = RecHead(8, 8, k=4, hidden=16, geometry=True, detach=detach)
        visual, cls = torch.randn(2, 16, 8, requires_grad=True), torch.randn(2, 8, requires_grad=True)
        box, _ = head(visual, cls, (4, 4))
        terms = box_losses(box, target)
        (terms["l1"] + terms["giou"]).backward()
        assert head.pool.key.weight.grad.abs().sum() > 0 and head.pool.query.weight.grad.abs().sum() > 0
        assert (visual.grad is None and cls.grad is None) if detach else visual.grad.abs().sum() > 0
