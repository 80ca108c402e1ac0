"""GroundingTask: the training unit for the shared engine (VG-LAW + losses + Mask Grounding), and build_task.

    L = l1 * L1 + giou * GIoU + focal * focal + dice * dice + mask_grounding * L_mg
        [+ rac * L_rac + mrc * L_mrc + cal * L_CAL + context * L_context]
    (defaults 1, 1, 4, 4, 1; the bracketed terms are off unless configured: AttBalance's region attention
    constraint and momentum constraint on the LAP maps (finetune/attbalance.py, finetune/momentum.py), MagNet's
    cross-modal alignment loss (finetune/cal.py), the other objects' masks and boxes from their own expressions
    (finetune/context_loss.py)). With `loss.dat` the box terms become AttBalance's
    per-sample re-weighted `dat_box = mean_b W_b * (l1 * L1_b + giou * GIoU_b)` (finetune/dat.py); `l1` and
    `giou` are still logged unweighted.

With model.head: mdetr the box and mask terms are those of the Hungarian-matched queries, plus
token * L_soft_token + align * L_contrastive (finetune/mdetr_losses.py); Mask Grounding is unchanged (it reads
the expression's merged mask and the union of its boxes), and so is CAL: its object pixels are the union of the
expression's target masks (the batch's merged `mask`), and a no-target expression, which has none, is left out
of CAL's mean like any sample without object or background pixels (finetune/cal.py).

`forward(batch)` returns every term and the weighted total under "loss"; `lr_multipliers()` puts both
backbones (the timm ViT and the text encoder) at `backbone_lr_mult` (VG-LAW: 4e-5 vs 4e-4 for the rest, which
includes the language adaptive weight generator and the heads) and the generator at `law_lr_mult`.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from finetune.attbalance import rac_multi
from finetune.backbone import LawViT
from finetune.cal import CrossModalAlignmentLoss
from finetune.cam import CrossModalAlignment
from finetune.config import (ConfigError, FinetuneConfig, GroundingLossConfig, GroundingModelConfig,
                             MaskGroundingConfig)
from finetune.context_loss import context_losses
from finetune.dat import dat_weights
from finetune.losses import box_losses_per_sample, dice_loss, focal_loss
from finetune.mask_grounding import MaskGrounding, mask_tokens
from finetune.mdetr_head import MdetrHead
from finetune.mdetr_losses import mdetr_losses, selection_loss
from finetune.model import VGLaw
from finetune.momentum import MomentumModel, mrc_per_sample
from pretrain.box_ops import box_cxcywh_to_xyxy, elementwise_iou
from pretrain.encoders import build_text_encoder, build_vision_encoder


class GroundingTask(nn.Module):
    def __init__(self, model: VGLaw, loss: GroundingLossConfig, *, mask_grounding: MaskGrounding | None = None,
                 mg_cfg: MaskGroundingConfig | None = None, mask_token_id: int = 103,
                 special_ids: Sequence[int] = (0, 101, 102), backbone_lr_mult: float = 0.1,
                 law_lr_mult: float = 1.0, text_len: int = 40) -> None:
        super().__init__()
        self.model = model
        self.mask_grounding = mask_grounding
        self.loss_cfg = loss
        self.mg_cfg = mg_cfg or MaskGroundingConfig(enabled=mask_grounding is not None)
        self.mask_token_id = mask_token_id
        self.special_ids = tuple(int(i) for i in special_ids)
        self.backbone_lr_mult = backbone_lr_mult
        self.law_lr_mult = law_lr_mult
        self.text_len = text_len
        self._flops: float | None = None
        # AttBalance's momentum model (fp32 EMA buffers, no parameters) and MagNet's CAL projection
        self.momentum = MomentumModel(model, loss.mrc_momentum) if loss.mrc > 0 else None
        self.cal = (CrossModalAlignmentLoss(model.text.hidden_size, model.vision.embed_dim, loss.cal_tau_pixel,
                                            loss.cal_tau_text, loss.cal_pixels) if loss.cal > 0 else None)

    def on_optimizer_step(self) -> None:
        """Called by the training loop after every optimizer step: the momentum model's EMA update."""
        if self.momentum is not None:
            self.momentum.update(self.model)

    def lr_multipliers(self) -> dict[str, float]:
        mults = {"model.vision.vit.": self.backbone_lr_mult, "model.text.": self.backbone_lr_mult}
        if self.law_lr_mult != 1.0:
            mults["model.vision.law."] = self.law_lr_mult
        return mults

    def flops_per_sample(self) -> float:
        """Forward + backward FLOPs of one training sample (3x the forward's matmul FLOPs, counted once with
        torch.utils.flop_counter on a dummy sample; Mask Grounding's second pass included when enabled)."""
        if self._flops is None:
            from torch.utils.flop_counter import FlopCounterMode

            p = next(self.parameters())
            size = self.model.vision.vit.patch_embed.img_size
            L = self.text_len
            batch = {"image": torch.zeros(1, 3, *size, device=p.device, dtype=p.dtype),
                     "text_ids": torch.full((1, L), 1000 % self.model.text.config.vocab_size, device=p.device),
                     "text_mask": torch.ones(1, L, dtype=torch.long, device=p.device),
                     "bbox": torch.tensor([[0.5, 0.5, 0.2, 0.2]], device=p.device),
                     "mask": torch.zeros(1, *size, device=p.device)}
            if self.model.multi:
                batch.update(boxes=batch["bbox"][:, None], n_targets=torch.ones(1, dtype=torch.long, device=p.device),
                             target_masks=batch["mask"][:, None])
            batch["text_ids"][0, 0] = self.special_ids[0] if self.special_ids else 0
            counter = FlopCounterMode(display=False)
            with torch.no_grad(), counter:
                self.forward(batch)
            self._flops = 3.0 * counter.get_total_flops()
        return self._flops

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per ViT block and per BERT layer (engine.activation_checkpointing)."""
        self.model.vision.set_grad_checkpointing(enable)
        self.model.text.set_grad_checkpointing(enable)

    def _dtype(self) -> torch.dtype:
        return self.model.res_head.up[0].weight.dtype

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image = batch["image"].to(self._dtype())       # DeepSpeed bf16 does not autocast inputs
        ids, mask = batch["text_ids"], batch["text_mask"]
        out = self.model(image, ids, mask)
        c = self.loss_cfg
        if self.model.multi:
            terms = mdetr_losses(out, batch, special_ids=self.special_ids, cost_token=c.cost_token,
                                 cost_l1=c.cost_l1, cost_giou=c.cost_giou, no_object=c.no_object,
                                 temperature=c.align_temperature, focal_alpha=c.focal_alpha, focal_gamma=c.focal_gamma)
            weights = {"l1": c.l1, "giou": c.giou, "token": c.token, "align": c.align, "focal": c.focal,
                       "dice": c.dice}
            if "token_scores" in out:       # query selection: which tokens the targets cover
                terms["select"] = selection_loss(out["token_scores"], batch["mask"], out["grid"])
                weights["select"] = c.select
            if self.cal is not None:        # the merged mask: every target's pixels, none for no target
                terms.update(self.cal(out["pixel_emb"], batch["mask"], out["text"], mask))
                weights["cal"] = c.cal
        else:
            terms, weights = self.single_target_losses(batch, image, out)
        if self.mask_grounding is not None and self.training and c.mask_grounding > 0:
            terms["mask_grounding"] = self.mask_grounding_loss(batch, image, out)
            weights["mask_grounding"] = c.mask_grounding
        terms["loss"] = sum(weights[k] * terms[k] for k in weights)
        return terms

    def single_target_losses(self, batch: dict[str, torch.Tensor], image: torch.Tensor,
                             out: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """VG-LAW's box and mask losses (+ AttBalance's RAC / MRC / DAT and MagNet's CAL where configured):
        (terms, weights)."""
        c = self.loss_cfg
        ids, mask = batch["text_ids"], batch["text_mask"]
        boxes = batch["bbox"]
        l1, giou = box_losses_per_sample(out["boxes"], boxes)
        terms = {"l1": l1.mean(), "giou": giou.mean()}
        terms["focal"] = focal_loss(out["mask_logits"], batch["mask"], c.focal_alpha, c.focal_gamma)
        terms["dice"] = dice_loss(out["mask_logits"], batch["mask"])
        weights = {"focal": c.focal, "dice": c.dice}
        attn_reg = None                                 # L_ar per sample, for DAT
        if c.rac > 0:
            iou = elementwise_iou(box_cxcywh_to_xyxy(out["boxes"].detach().float()),
                                  box_cxcywh_to_xyxy(boxes.float()))
            per, _ = rac_multi(out["attn_maps"], boxes, out["grid"], iou)
            terms["rac"], weights["rac"] = per.mean(), c.rac
            attn_reg = per.detach()
        if self.momentum is not None and self.training:
            self.momentum.ensure_initialised(self.model)
            per = mrc_per_sample(self.momentum.attention_maps(self.model, image, ids, mask), out["attn_maps"])
            terms["mrc"], weights["mrc"] = per.mean(), c.mrc
            attn_reg = per.detach() if attn_reg is None else attn_reg + per.detach()
        if c.dat:
            w = dat_weights(attn_reg, boxes)
            terms["dat_box"], weights["dat_box"] = (w * (c.l1 * l1 + c.giou * giou)).mean(), 1.0
            terms["dat_weight"] = w.mean()
        else:
            weights.update(l1=c.l1, giou=c.giou)
        if self.cal is not None:
            cal = self.cal(out["pixel_emb"], batch["mask"], out["text"], mask)
            terms.update(cal)
            weights["cal"] = c.cal
        if c.context > 0 and self.training and "context_valid" in batch:
            box = c.context_box
            terms.update(context_losses(self.model, out, batch, focal=c.focal, dice=c.dice, l1=c.l1 if box else 0.0,
                                        giou=c.giou if box else 0.0, focal_alpha=c.focal_alpha,
                                        focal_gamma=c.focal_gamma))
            weights["context"] = c.context
        return terms, weights

    def mask_grounding_loss(self, batch: dict[str, torch.Tensor], image: torch.Tensor,
                            out: dict[str, torch.Tensor]) -> torch.Tensor:
        """MagNet's masked-token prediction. By default the visual tokens come from a second backbone pass
        conditioned on the *masked* text: the main pass saw the unmasked words through the LAW weights."""
        k = max(1, round(self.mg_cfg.batch_fraction * image.shape[0]))
        ids, mask = batch["text_ids"][:k], batch["text_mask"][:k]
        masked, positions = mask_tokens(ids, mask, self.mg_cfg.mask_ratio, self.mask_token_id, self.special_ids)
        text = self.model.encode_text(masked, mask)
        if self.mg_cfg.reuse_visual:
            visual = out["visual"][:k]
        else:
            visual, _ = self.model.vision(image[:k], text, mask)
        return self.mask_grounding(text, mask, visual, batch["mask"][:k], batch["bbox"][:k], positions, ids)


def _skip_dims(cfg: GroundingModelConfig, vision: LawViT) -> tuple[int, int] | None:
    """model.res_skip: keep the conv stem's stride-8 and stride-4 maps from every pass -> their widths."""
    if not cfg.res_skip:
        return None
    try:
        return tuple(vision.tap_stem([8, 4]))
    except ValueError as err:
        raise ConfigError("model.res_skip reads the conv stem's stride-8 and stride-4 maps: set "
                          f"model.vision.conv_stem (4 widths for a /16 ViT); {err}") from None


def build_model(cfg: GroundingModelConfig, vocab_size: int | None = None) -> VGLaw:
    """VG-LAW from config: timm ViT (at cfg.vision.img_size) + TextEncoder + LAW + heads (+ MagNet's CAM with
    model.cam, + per-block LAP maps with model.attn_layers), randomly initialised unless cfg.vision.checkpoint /
    cfg.text.bert point at weights."""
    vit = build_vision_encoder(cfg.vision)
    depth = len(vit.blocks)
    bad = [i for i in cfg.attn_layers if i >= depth]
    if bad:
        raise ConfigError(f"model.attn_layers: block {bad[0]} does not exist (the ViT has blocks 0-{depth - 1})")
    text = build_text_encoder(cfg.text, vocab_size)
    d_l = text.hidden_size
    vision = LawViT(vit, d_l, window_size=cfg.window_size, global_blocks=cfg.global_blocks, law=cfg.law,
                    groups=cfg.law_groups, reduction=cfg.law_reduction, rank=cfg.law_rank,
                    init_std=cfg.law_init_std)
    cam = None
    if cfg.cam:
        if vision.embed_dim % cfg.cam_heads or d_l % cfg.cam_heads:
            raise ConfigError(f"model.cam_heads={cfg.cam_heads} must divide the visual width {vision.embed_dim} "
                              f"and the text width {d_l}")
        cam = CrossModalAlignment(vision.embed_dim, d_l, pools=cfg.cam_pools, heads=cfg.cam_heads)
    mdetr = None
    if cfg.head == "mdetr":
        m = cfg.mdetr
        tokens = math.prod(vision.vit.patch_embed.grid_size)
        if m.select and m.queries > tokens:
            raise ConfigError(f"model.mdetr.select: {m.queries} queries need as many visual tokens, the "
                              f"{cfg.vision.img_size} px input gives {tokens}")
        mdetr = MdetrHead(vision.embed_dim, d_l, vision.embed_dim, queries=m.queries, dim=m.dim, depth=m.depth,
                          heads=m.heads, align_dim=m.align_dim, box=m.box, select=m.select)
    return VGLaw(text, vision, d_l, lap_dim=cfg.lap_dim, head_hidden=cfg.head_hidden, res_hidden=cfg.res_hidden,
                 mask_threshold=cfg.mask_threshold, lap_geometry=cfg.lap_geometry,
                 rec_detach=cfg.rec_detach, attn_layers=cfg.attn_layers, cam=cam, text_pool=cfg.text_pool,
                 mdetr=mdetr, score_threshold=cfg.mdetr.score_threshold, skip_dims=_skip_dims(cfg, vision))


def build_task(cfg: FinetuneConfig, tokenizer=None) -> GroundingTask:
    """GroundingTask from the config; `tokenizer` supplies the vocabulary size and [MASK]/special ids."""
    vocab_size = len(tokenizer) if tokenizer is not None else None
    model = build_model(cfg.model, vocab_size)
    mg_cfg = cfg.model.mask_grounding
    mg = None
    if mg_cfg.enabled:
        mg = MaskGrounding(model.text.hidden_size, model.vision.embed_dim, model.text.config.vocab_size,
                           dim=mg_cfg.dim, depth=mg_cfg.depth, heads=mg_cfg.heads, use_box=mg_cfg.use_box)
    kwargs = {}
    if tokenizer is not None:
        kwargs["mask_token_id"] = tokenizer.mask_token_id
        kwargs["special_ids"] = tuple(tokenizer.all_special_ids)
    return GroundingTask(model, cfg.loss, mask_grounding=mg, mg_cfg=mg_cfg,
                         backbone_lr_mult=cfg.backbone_lr_mult, law_lr_mult=cfg.law_lr_mult,
                         text_len=cfg.data.max_len, **kwargs)
