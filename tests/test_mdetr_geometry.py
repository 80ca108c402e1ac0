"""The multi-instance head's geometry box (model.mdetr.box: geometry): each query's box starts at the reference
box of its own attention map and the box losses train that map; the mlp box is unchanged; MagNet's CAL with the
mdetr head leaves no-target samples out."""
from __future__ import annotations

import pytest
import torch

from finetune.cal import CrossModalAlignmentLoss
from finetune.heads import attention_geometry, reference_boxes
from finetune.mdetr_head import MdetrHead
from finetune.task import build_task
from finetune_helpers import tiny_batch, tiny_config
from pretrain.config import ConfigError

HW = (4, 6)
MDETR = {"model.head": "mdetr", "model.mdetr": {"queries": 4, "dim": 32, "depth": 2, "heads": 4, "align_dim": 16}}
GEOMETRY = {"model.head": "mdetr", "model.mdetr": {**MDETR["model.mdetr"], "box": "geometry"}}


def _head(box: str | None = None, seed: int = 0) -> MdetrHead:
    torch.manual_seed(seed)
    kw = {} if box is None else {"box": box}
    return MdetrHead(24, 20, 12, queries=5, dim=32, depth=2, heads=4, align_dim=8, **kw)


def _inputs(B: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    visual = torch.randn(B, HW[0] * HW[1], 24, generator=g)
    text = torch.randn(B, 7, 20, generator=g)
    text_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])[:B]
    pixels = torch.randn(B, 12, 16, 24, generator=g)
    return visual, HW, text, text_mask, pixels


def test_geometry_box_starts_at_the_reference_box_of_each_querys_map():
    head = _head("geometry")
    out = head(*_inputs())
    attn = out["query_attn"]
    assert attn.shape == (2, 5, HW[0] * HW[1]) and torch.allclose(attn.sum(-1), torch.ones(2, 5))
    assert (attn[:, 0] - attn[:, 1]).abs().max() > 1e-4                # one map per query
    ref = reference_boxes(attention_geometry(attn.flatten(0, 1), HW), HW).view(2, 5, 4)
    assert torch.allclose(out["pred_boxes"], ref, atol=1e-6)           # zero-initialised correction


def test_box_loss_reaches_the_map():
    head = _head("geometry")
    visual, hw, text, text_mask, pixels = _inputs()
    out = head(visual, hw, text, text_mask, pixels)
    out["query_attn"].retain_grad()
    (out["pred_boxes"] - torch.tensor([0.3, 0.6, 0.2, 0.3])).abs().sum().backward()
    assert out["query_attn"].grad.abs().max() > 0
    # the map's key / query projections (used by nothing else) and the correction MLP's last layer
    for p in (head.geometry.key.weight, head.geometry.query.weight, head.box[-1].weight):
        assert p.grad is not None and p.grad.abs().max() > 0


def test_mlp_box_unchanged():
    """box: mlp (the default) is MDETR's sigmoid(MLP(decoder output)) with the same parameters and the same
    initial weights as before the option: the geometry modules are built last, so every module the two heads
    share draws the same weights from the same seed."""
    default, mlp, geom = _head(), _head("mlp"), _head("geometry")
    sd, sg = default.state_dict(), geom.state_dict()
    assert sd.keys() == mlp.state_dict().keys()
    assert not any(k.startswith("geometry.") for k in sd)
    for k, v in sd.items():
        assert torch.equal(v, mlp.state_dict()[k])
        if not k.startswith("box.4."):                                 # the last layer: zero in geometry
            assert torch.equal(v, sg[k]), k
    assert not sg["box.4.weight"].any() and set(sg) - set(sd) == {f"geometry.{m}.{p}" for m in ("key", "query")
                                                                    for p in ("weight", "bias")}
    hs = {}
    default.decoder.register_forward_hook(lambda m, i, o: hs.update(hs=o))
    out = default(*_inputs())
    assert "query_attn" not in out
    assert torch.equal(out["pred_boxes"], default.box(hs["hs"]).sigmoid())
    with pytest.raises(ValueError, match="box"):
        _head("deformable")


def _pixels_and_masks():
    g = torch.Generator().manual_seed(3)
    pixel_emb = torch.randn(2, 8, 8, 8, generator=g, requires_grad=True)
    mask = torch.zeros(2, 32, 32)
    mask[0, 4:20, 8:24] = 1                                             # sample 1: no target, no object pixel
    text = torch.randn(2, 5, 6, generator=g)
    return pixel_emb, mask, text, torch.ones(2, 5, dtype=torch.long)


def test_cal_leaves_a_no_target_sample_out():
    torch.manual_seed(0)
    cal = CrossModalAlignmentLoss(6, 8, max_pixels=0)                  # every pixel: no random draw
    pixel_emb, mask, text, text_mask = _pixels_and_masks()
    both = cal(pixel_emb, mask, text, text_mask)
    assert torch.isfinite(both["cal"]) and both["cal"] > 0
    alone = cal(pixel_emb[:1], mask[:1], text[:1], text_mask[:1])
    assert torch.allclose(both["cal"], alone["cal"], atol=1e-6)
    both["cal"].backward()
    assert torch.isfinite(pixel_emb.grad).all()
    assert pixel_emb.grad[1].abs().max() == 0 and pixel_emb.grad[0].abs().max() > 0
    none = cal(pixel_emb[1:], mask[1:], text[1:], text_mask[1:])["cal"]   # a batch of no-target samples only
    assert float(none.detach()) == 0.0


def test_cal_with_the_mdetr_head():
    torch.manual_seed(0)
    task = build_task(tiny_config(**GEOMETRY, **{"loss.cal": 1.0, "model.mask_grounding.enabled": False}))
    b = tiny_batch(n=2)
    b["mask"][1] = 0                                                   # the batch's merged mask of no target
    b.update(boxes=torch.zeros(2, 2, 4), n_targets=torch.tensor([1, 0]), target_masks=b["mask"][:, None]
             .repeat(1, 2, 1, 1).byte())
    b["boxes"][0, 0] = b["bbox"][0]
    terms = task(b)
    assert set(terms) >= {"cal", "cal_p2p", "cal_p2t"} and torch.isfinite(terms["loss"])
    rest = sum(w * terms[k] for k, w in (("l1", 1.0), ("giou", 1.0), ("token", 1.0), ("align", 1.0),
                                         ("focal", 4.0), ("dice", 4.0)))
    assert torch.allclose(terms["loss"], rest + terms["cal"])          # weight loss.cal = 1
    terms["loss"].backward()
    assert task.cal.text_proj.weight.grad.abs().max() > 0
    assert all(torch.isfinite(p.grad).all() for p in task.parameters() if p.grad is not None)


def test_config_accepts_cal_and_the_box_option_with_mdetr():
    cfg = tiny_config(**GEOMETRY, **{"loss.cal": 1.0})
    assert cfg.loss.cal == 1.0 and cfg.model.mdetr.box == "geometry"
    assert tiny_config(**MDETR).model.mdetr.box == "mlp"              # the code default: MDETR's box
    for key, value in (("loss.rac", 1.0), ("loss.mrc", 1.0), ("loss.dat", True), ("model.attn_layers", [1])):
        with pytest.raises(ConfigError, match=key):
            tiny_config(**GEOMETRY, **{"loss.cal": 1.0, key: value})
    with pytest.raises(ConfigError, match="model.mdetr.box"):
        tiny_config(**{"model.head": "mdetr", "model.mdetr": {"box": "deformable"}})


@pytest.mark.parametrize("key, value", [("loss.align_temperature", 0.0), ("loss.no_object", -0.1),
                                        ("loss.token", -1.0), ("loss.cost_l1", -5.0)])
def test_config_rejects_bad_mdetr_loss_values(key, value):
    with pytest.raises(ConfigError, match=key):
        tiny_config(**MDETR, **{key: value})
