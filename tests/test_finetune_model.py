"""VG-LAW model pieces: language adaptive weights, ViTDet windowing, heads, Mask Grounding."""
from __future__ import annotations

import pytest
import torch

from finetune.mask_grounding import mask_tokens
from finetune.task import build_model, build_task
from finetune_helpers import overfit, tiny_batch, tiny_config


def _two_expressions(n: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b = tiny_batch(n=n, seed=1)
    image = b["image"][:1].expand(n, -1, -1, -1).contiguous()      # same image, different expressions
    return image, b["text_ids"], b["text_mask"]


def test_zero_phi_backbone_equals_plain_vit():
    torch.manual_seed(0)
    model = build_model(tiny_config(**{"model.window_size": 0}).model).eval()
    image, ids, mask = _two_expressions()
    with torch.no_grad():
        text = model.encode_text(ids, mask)
        feats, _ = model.vision(image, text, mask)
        vit = model.vision.vit                       # timm's own blocks on the same (cls-free) tokens
        x, _ = model.vision.embed(image)
        plain = vit.norm(vit.blocks(x))
    assert not torch.allclose(text[0], text[1])
    torch.testing.assert_close(feats[0], feats[1])
    torch.testing.assert_close(feats, plain, rtol=1e-5, atol=1e-5)


def test_one_step_makes_expressions_matter():
    torch.manual_seed(0)
    task = build_task(tiny_config(**{"model.mask_grounding.enabled": False}))
    opt = torch.optim.AdamW(task.parameters(), lr=1e-2)
    task(tiny_batch())["loss"].backward()
    opt.step()
    task.eval()
    image, ids, mask = _two_expressions()
    with torch.no_grad():
        feats, _ = task.model.vision(image, task.model.encode_text(ids, mask), mask)
    assert task.model.vision.law.phi_weight.abs().sum() > 0
    assert (feats[0] - feats[1]).abs().max() > 1e-4


def _backbone_change(global_blocks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(tiny_config(**{"model.global_blocks": global_blocks}).model).eval()
    image, ids, mask = _two_expressions(1)
    moved = image.clone()
    moved[..., :16, :16] += 1.0                      # patch (0, 0): inside window (0, 0) of the 4x4 grid
    with torch.no_grad():
        text = model.encode_text(ids, mask)
        a = model.vision(image, text, mask)[0].view(4, 4, -1)
        b = model.vision(moved, text, mask)[0].view(4, 4, -1)
    change = (a - b).abs().amax(-1)
    return change[:2, :2].amax(), torch.stack([change[:2, 2:].amax(), change[2:, :2].amax(), change[2:, 2:].amax()])


def test_windowed_blocks_keep_windows_apart():
    inside, outside = _backbone_change([])           # every block windowed (window 2 on a 4x4 grid)
    assert inside > 1e-3
    assert outside.max() == 0


def test_global_block_mixes_windows():
    inside, outside = _backbone_change([3])
    assert inside > 1e-3 and (outside > 1e-6).all()
    model = build_model(tiny_config().model)
    assert [model.vision.is_windowed(i) for i in range(4)] == [True, False, True, False]


def test_window_padding_masks_padded_keys():
    # 80 px -> 5x5 grid, window 2 pads to 6x6; padded keys are masked out, so adding the padding changes nothing
    torch.manual_seed(0)
    cfg = tiny_config(**{"model.vision.img_size": 80, "data.image_size": 80, "model.global_blocks": []})
    model = build_model(cfg.model).eval()
    image = torch.randn(1, 3, 80, 80)
    ids, mask = tiny_batch(n=1)["text_ids"], tiny_batch(n=1)["text_mask"]
    with torch.no_grad():
        feats, hw = model.vision(image, model.encode_text(ids, mask), mask)
    assert hw == (5, 5) and feats.shape[1] == 25 and torch.isfinite(feats).all()


def test_heads_lap_sums_to_one_and_mask_has_input_size():
    torch.manual_seed(0)
    model = build_model(tiny_config().model).eval()
    b = tiny_batch(n=3)
    with torch.no_grad():
        out = model(b["image"], b["text_ids"], b["text_mask"])
    torch.testing.assert_close(out["lap_attn"].sum(-1), torch.ones(3))
    assert (out["lap_attn"] >= 0).all()
    assert out["mask_logits"].shape == (3, 64, 64)
    assert out["boxes"].shape == (3, 4) and ((out["boxes"] > 0) & (out["boxes"] < 1)).all()


def test_mask_tokens_only_words():
    ids = torch.tensor([[101, 7, 8, 9, 102, 0], [101, 102, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    masked, pos = mask_tokens(ids, mask, 0.5, mask_id=103, special_ids=(0, 101, 102))
    assert pos[0].sum() == 2 and pos[1].sum() == 0    # round(0.5 * 3) words; none to mask in row 1
    assert not pos[0, [0, 4, 5]].any()
    assert (masked[pos] == 103).all() and torch.equal(masked[~pos], ids[~pos])


@pytest.mark.slow
def test_mask_grounding_loss_falls():
    torch.manual_seed(0)
    task = build_task(tiny_config())
    batch = tiny_batch(n=4, seed=3)
    losses = [out["mask_grounding"].item() for out in overfit(task, batch, steps=25, lr=2e-3)]
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5
    assert "mask_grounding" not in build_task(tiny_config(**{"model.mask_grounding.enabled": False}))(batch)


def test_lr_multipliers_cover_both_backbones():
    task = build_task(tiny_config())
    mults = task.lr_multipliers()
    assert mults == {"model.vision.vit.": 0.1, "model.text.": 0.1}
    names = [n for n, _ in task.named_parameters()]
    slow = [n for n in names if n.startswith(tuple(mults))]
    assert "model.vision.vit.blocks.0.attn.qkv.weight" in slow
    assert "model.text.layer.0.attention.self.query.weight" in slow
    assert not any(n.startswith(("model.vision.law.", "model.rec_head.", "model.res_head.", "mask_grounding."))
                   for n in slow)


def test_flops_per_sample_counts_the_mask_grounding_pass():
    plain = build_task(tiny_config(**{"model.mask_grounding.enabled": False})).flops_per_sample()
    with_mg = build_task(tiny_config()).flops_per_sample()
    # LAW ViT forward alone: 4 blocks of qkv/proj/mlp matmuls on 16 tokens of width 48 (x3 for backward)
    vit_matmuls = 3 * 4 * 2 * 16 * (48 * 144 + 48 * 48 + 2 * 48 * 192)
    assert plain > vit_matmuls
    assert with_mg > plain + vit_matmuls                # second backbone pass on the masked text


def test_bf16_training_step():
    # DeepSpeed bf16 casts the weights and every floating input to bf16 (no autocast)
    torch.manual_seed(0)
    task = build_task(tiny_config()).to(torch.bfloat16)
    batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tiny_batch(n=2).items()}
    out = task(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["mask_grounding"] > 0
    assert task.model.vision.law.phi_weight.grad is not None


def test_mask_grounding_batch_fraction_is_the_loss_of_the_leading_samples():
    """batch_fraction=0.5 on 4 samples: the masked-token loss of samples 0-1 alone (same mask draw)."""
    from pretrain.config import ConfigError

    torch.manual_seed(0)
    part = build_task(tiny_config(**{"model.mask_grounding.batch_fraction": 0.5})).eval()   # no dropout
    full = build_task(tiny_config()).eval()
    full.load_state_dict(part.state_dict())
    batch = tiny_batch(4)
    head = {k: v[:2] for k, v in batch.items()}
    losses = []
    for task, b in ((part, batch), (full, head)):
        out = task.model(b["image"], b["text_ids"], b["text_mask"])
        torch.manual_seed(1)
        losses.append(task.mask_grounding_loss(b, b["image"], out))
    assert torch.isfinite(losses[0]) and losses[0].item() == pytest.approx(losses[1].item(), rel=1e-5)
    with pytest.raises(ConfigError):
        tiny_config(**{"model.mask_grounding.batch_fraction": 0.0})


def test_short_overfit_answers_two_expressions_on_one_image_differently():
    """One image with two squares and one expression for each: after a short overfit the boxes follow the
    expression (each within IoU 0.5 of its own square, and apart), so the output depends on the text."""
    from pretrain.box_ops import box_cxcywh_to_xyxy, elementwise_iou

    torch.manual_seed(0)
    task = build_task(tiny_config(**{"model.mask_grounding.enabled": False}))
    size = 64
    image = torch.full((1, 3, size, size), -1.0)
    image[0, 0, 8:24, 8:24] = 2.0                       # a "red" square top left
    image[0, 2, 36:60, 36:60] = 2.0                     # a "blue" square bottom right
    ids = torch.tensor([[101 % 120, 7, 8, 0], [101 % 120, 9, 10, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    boxes = torch.tensor([[16 / size, 16 / size, 16 / size, 16 / size], [48 / size, 48 / size, 24 / size, 24 / size]])
    masks = torch.zeros(2, size, size)
    masks[0, 8:24, 8:24] = 1
    masks[1, 36:60, 36:60] = 1
    batch = {"image": image.expand(2, -1, -1, -1).contiguous(), "text_ids": ids, "text_mask": mask,
             "bbox": boxes, "mask": masks}
    overfit(task, batch, steps=150, lr=1e-3)
    task.eval()
    pred = task.model.predict(batch["image"], ids, mask)["boxes"]
    iou = elementwise_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(boxes))
    assert (iou > 0.5).all(), iou
    assert (pred[0] - pred[1]).abs().max() > 0.2


def test_text_pool_mean_ignores_padding_and_is_validated():
    from finetune.config import GroundingModelConfig
    from finetune.model import masked_mean
    from pretrain.config import ConfigError, from_dict

    tokens = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.allclose(masked_mean(tokens, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))
    with pytest.raises(ConfigError, match="model.text_pool: expected cls or mean"):
        from_dict(GroundingModelConfig, {"text_pool": "max"}, prefix="model.")
