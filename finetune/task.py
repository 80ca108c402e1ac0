"""GroundingTask: the training unit for the shared engine (VG-LAW + losses + Mask Grounding), and build_task.

    L = l1 * L1 + giou * GIoU + focal * focal + dice * dice + mask_grounding * L_mg [+ rac * L_rac]
    (defaults 1, 1, 4, 4, 1; rac, AttBalance's constraint on the LAP attention, off unless configured)

With model.head: mdetr the box and mask terms are those of the Hungarian-matched queries, plus
token * L_soft_token + align * L_contrastive (finetune/mdetr_losses.py); Mask Grounding is unchanged (it reads
the expression's merged mask and the union of its boxes).

`forward(batch)` returns every term and the weighted total under "loss"; `lr_multipliers()` puts both
backbones (the timm ViT and the text encoder) at `backbone_lr_mult` (VG-LAW: 4e-5 vs 4e-4 for the rest, which
includes the language adaptive weight generator and the heads) and the generator at `law_lr_mult`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from finetune.attbalance import rac_loss
from finetune.backbone import LawViT
from finetune.config import FinetuneConfig, GroundingLossConfig, GroundingModelConfig, MaskGroundingConfig
from finetune.losses import box_losses, dice_loss, focal_loss
from finetune.mask_grounding import MaskGrounding, mask_tokens
from finetune.mdetr_head import MdetrHead
from finetune.mdetr_losses import mdetr_losses
from finetune.model import VGLaw
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
        else:
            terms = box_losses(out["boxes"], batch["bbox"])
            terms["focal"] = focal_loss(out["mask_logits"], batch["mask"], c.focal_alpha, c.focal_gamma)
            terms["dice"] = dice_loss(out["mask_logits"], batch["mask"])
            weights = {"l1": c.l1, "giou": c.giou, "focal": c.focal, "dice": c.dice}
        if c.rac > 0:
            terms["rac"] = rac_loss(out["lap_attn"], batch["bbox"], out["grid"])
            weights["rac"] = c.rac
        if self.mask_grounding is not None and self.training and c.mask_grounding > 0:
            terms["mask_grounding"] = self.mask_grounding_loss(batch, image, out)
            weights["mask_grounding"] = c.mask_grounding
        terms["loss"] = sum(weights[k] * terms[k] for k in weights)
        return terms

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


def build_model(cfg: GroundingModelConfig, vocab_size: int | None = None) -> VGLaw:
    """VG-LAW from config: timm ViT (at cfg.vision.img_size) + TextEncoder + LAW + heads, randomly initialised
    unless cfg.vision.checkpoint / cfg.text.bert point at weights."""
    vit = build_vision_encoder(cfg.vision)
    text = build_text_encoder(cfg.text, vocab_size)
    d_l = text.hidden_size
    vision = LawViT(vit, d_l, window_size=cfg.window_size, global_blocks=cfg.global_blocks, law=cfg.law,
                    groups=cfg.law_groups, reduction=cfg.law_reduction, rank=cfg.law_rank)
    mdetr = None
    if cfg.head == "mdetr":
        m = cfg.mdetr
        mdetr = MdetrHead(vision.embed_dim, d_l, vision.embed_dim, queries=m.queries, dim=m.dim, depth=m.depth,
                          heads=m.heads, align_dim=m.align_dim)
    return VGLaw(text, vision, d_l, lap_dim=cfg.lap_dim, head_hidden=cfg.head_hidden, res_hidden=cfg.res_hidden,
                 mask_threshold=cfg.mask_threshold, lap_geometry=cfg.lap_geometry,
                 rec_detach=cfg.rec_detach, mdetr=mdetr, score_threshold=cfg.mdetr.score_threshold)


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
