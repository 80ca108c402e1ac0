"""The multi-instance head in the model: shapes, the config switch, and a short overfit in which one expression
finds its two targets, another its one target and a third none."""
from __future__ import annotations

import pytest
import torch

from finetune.task import build_model, build_task
from finetune_helpers import tiny_batch, tiny_config
from pretrain.config import ConfigError

MDETR = {"model.head": "mdetr", "model.mdetr": {"queries": 4, "dim": 32, "depth": 2, "heads": 4, "align_dim": 16}}


def test_head_outputs_and_switch():
    torch.manual_seed(0)
    model = build_model(tiny_config(**MDETR).model).eval()
    assert model.multi and model.rec_head is None
    assert not build_model(tiny_config().model).multi                        # the default stays vglaw
    b = tiny_batch(n=2)
    out = model.predict(b["image"], b["text_ids"], b["text_mask"])
    assert out["boxes"].shape == (2, 4, 4) and out["scores"].shape == (2, 4)
    assert out["mask_logits"].shape == (2, 4, 16, 16)                       # pixel embeddings at 1/4 of 64
    assert ((out["scores"] >= 0) & (out["scores"] <= 1)).all()
    with pytest.raises(ConfigError, match="model.head"):
        tiny_config(**{"model.head": "detr"})
    with pytest.raises(ConfigError, match="rac"):
        tiny_config(**MDETR, **{"loss.rac": 1.0})


def _boxes_mask(size, squares):
    boxes = torch.zeros(2, 4)
    masks = torch.zeros(2, size, size)
    for k, (y0, x0, s) in enumerate(squares):
        boxes[k] = torch.tensor([(x0 + s / 2) / size, (y0 + s / 2) / size, s / size, s / size])
        masks[k, y0:y0 + s, x0:x0 + s] = 1
    return boxes, masks


def test_short_overfit_finds_two_targets_one_and_none():
    from pretrain.box_ops import box_cxcywh_to_xyxy, box_iou

    torch.manual_seed(0)
    task = build_task(tiny_config(**MDETR, **{"model.mask_grounding.enabled": False}))
    size = 64
    image = torch.full((1, 3, size, size), -1.0)
    red = [(6, 6, 16), (40, 36, 20)]
    image[0, 0, 6:22, 6:22] = 2.0                       # two "red" squares
    image[0, 0, 40:60, 36:56] = 2.0
    image[0, 2, 6:24, 40:58] = 2.0                      # one "blue" square
    two, two_masks = _boxes_mask(size, red)
    one, one_masks = _boxes_mask(size, [(6, 40, 18)])
    ids = torch.tensor([[101 % 120, 7, 8, 102 % 120], [101 % 120, 9, 10, 102 % 120], [101 % 120, 11, 12, 102 % 120]])
    batch = {"image": image.expand(3, -1, -1, -1).contiguous(), "text_ids": ids, "text_mask": torch.ones(3, 4).long(),
             "boxes": torch.stack([two, one, torch.zeros(2, 4)]), "n_targets": torch.tensor([2, 1, 0]),
             "target_masks": torch.stack([two_masks, one_masks, torch.zeros(2, size, size)]).byte()}
    batch["bbox"], batch["mask"] = batch["boxes"][:, 0], batch["target_masks"][:, 0].float()
    task.special_ids = (0, 101 % 120, 102 % 120)
    opt = torch.optim.AdamW(task.parameters(), lr=2e-3)
    for _ in range(200):
        opt.zero_grad()
        task(batch)["loss"].backward()
        opt.step()
    task.eval()
    out = task.model.predict(batch["image"], ids, batch["text_mask"])
    kept = out["scores"] >= task.model.score_threshold
    assert kept.sum(1).tolist() == [2, 1, 0], out["scores"]
    for i, gt in ((0, two), (1, one[:1])):
        iou, _ = box_iou(box_cxcywh_to_xyxy(out["boxes"][i][kept[i]]), box_cxcywh_to_xyxy(gt))
        assert (iou.amax(0) > 0.5).all() and (iou.amax(1) > 0.5).all(), iou   # each target found, once
