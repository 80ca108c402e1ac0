"""The multi-instance head in the model: shapes, the config switch, and a short overfit in which one expression
finds its two targets, another its one target and a third none."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from finetune.task import build_model, build_task
from finetune_helpers import overfit, tiny_batch, tiny_config
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


@pytest.mark.parametrize("select", [False, True])
def test_short_overfit_finds_two_targets_one_and_none(select):
    from pretrain.box_ops import box_cxcywh_to_xyxy, box_iou

    torch.manual_seed(0)
    task = build_task(tiny_config(**MDETR, **{"model.mask_grounding.enabled": False, "model.mdetr.select": select}))
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
    batch["bbox"], batch["mask"] = batch["boxes"][:, 0], batch["target_masks"].amax(1).float()   # the union
    task.special_ids = (0, 101 % 120, 102 % 120)
    overfit(task, batch, steps=200, lr=2e-3)
    task.eval()
    out = task.model.predict(batch["image"], ids, batch["text_mask"])
    kept = out["scores"] >= task.model.score_threshold
    assert kept.sum(1).tolist() == [2, 1, 0], out["scores"]
    for i, gt in ((0, two), (1, one[:1])):
        iou, _ = box_iou(box_cxcywh_to_xyxy(out["boxes"][i][kept[i]]), box_cxcywh_to_xyxy(gt))
        assert (iou.amax(0) > 0.5).all() and (iou.amax(1) > 0.5).all(), iou   # each target found, once


def _unused(task, batch) -> list[str]:
    task(batch)["loss"].backward()
    return [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]


def test_every_parameter_trains():
    """The head adds no parameter without a gradient (DeepSpeed and DDP need that): the mask head's [CLS]
    projection is not built for the multi-instance head, whose queries take its place. (The ViT's cls_token is
    unused by either head: LawViT drops it.)"""
    torch.manual_seed(0)
    task = build_task(tiny_config(**MDETR))
    assert task.model.res_head.text_proj is None
    b = tiny_batch(n=2)
    b.update(boxes=torch.stack([b["bbox"], b["bbox"].flip(0)], 1), n_targets=torch.tensor([2, 1]),
             target_masks=torch.stack([b["mask"], b["mask"]], 1).byte())
    assert _unused(task, b) == _unused(build_task(tiny_config()), b) == ["model.vision.vit.cls_token"]
    assert task.flops_per_sample() > 0                # the engine counts it under no_grad with module hooks


def test_query_selection_starts_the_queries_on_the_best_tokens():
    """model.mdetr.select: the Q best-scoring visual tokens (best first) are added to the Q learned queries, the
    scores get the "select" loss, and every parameter still trains."""
    torch.manual_seed(0)
    task = build_task(tiny_config(**MDETR, **{"model.mdetr.select": True, "loss.select": 2.0}))
    b = tiny_batch(n=2)
    b.update(boxes=torch.stack([b["bbox"], b["bbox"].flip(0)], 1), n_targets=torch.tensor([2, 1]),
             target_masks=torch.stack([b["mask"], b["mask"]], 1).byte())
    out = task.model(b["image"].float(), b["text_ids"], b["text_mask"])
    assert out["selected"].shape == (2, 4)
    assert torch.equal(out["selected"], out["token_scores"].topk(4, dim=1).indices)
    terms = task(b)
    assert terms["select"] > 0
    assert _unused(task, b) == ["model.vision.vit.cls_token"]
    head = task.model.mdetr
    with pytest.raises(ValueError, match="at least 4 visual tokens"):      # 3 tokens for 4 queries
        head(torch.randn(1, 3, head.vis_proj.in_features), (1, 3), out["text"][:1], b["text_mask"][:1],
             out["pixel_emb"][:1])
    with pytest.raises(ConfigError, match="model.mdetr.select: 20 queries need as many visual tokens"):
        build_model(tiny_config(**{**MDETR, "model.mdetr": {**MDETR["model.mdetr"], "queries": 20, "select": True}}).model)
    assert "token_scores" not in build_task(tiny_config(**MDETR)).model(b["image"].float(), b["text_ids"],
                                                                       b["text_mask"])


def test_predict_image_answers_several_boxes(tok):
    from PIL import Image

    from finetune.predict import draw_prediction, predict_image

    torch.manual_seed(0)
    model = build_model(tiny_config(**MDETR, **{"model.text.max_len": 16, "model.mdetr.score_threshold": 0.01}).model,
                        len(tok)).eval()
    image = torch.randint(0, 255, (3, 40, 60), dtype=torch.uint8)
    pred = predict_image(model, image, "red circle", tok, image_size=64, max_len=16)
    assert len(pred["bboxes"]) == len(pred["masks"]) == len(pred["scores"]) == 4 and not pred["no_target"]
    assert pred["mask"].shape == (40, 60) and all(m.shape == (40, 60) for m in pred["masks"])
    assert (pred["mask"] == np.logical_or.reduce(pred["masks"])).all()
    pic = draw_prediction(Image.fromarray(image.permute(1, 2, 0).numpy()), pred["bbox"], pred["mask"], "x", [])
    assert pic.size == (60, 40)
