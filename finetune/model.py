"""The VG-LAW model: text encoder -> language adaptive ViT -> box and mask heads. No fusion module: the
expression enters the visual backbone through its qkv weights, and the heads through its [CLS] feature.

With a multi-instance head (`mdetr`, finetune/mdetr_head.py; config model.head: mdetr) the LAP box head is not
built: N object queries read the visual and text tokens and the mask head's pixel embeddings, and answer with
several boxes and masks or none. Its outputs include the pixel embeddings too (MagNet's CAL reads them)."""
from __future__ import annotations

import torch
from torch import nn

from finetune.backbone import LawViT
from finetune.cam import CrossModalAlignment
from finetune.heads import LanguageAdaptivePooling, RecHead, ResHead


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the valid tokens: [B,L,D], [B,L] -> [B,D]."""
    m = mask.to(tokens.dtype)[..., None]
    return (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)


class VGLaw(nn.Module):
    """`text` maps (ids [B,L], mask [B,L]) to features [B,L,d_l]; `vision` is a LawViT."""

    def __init__(self, text: nn.Module, vision: LawViT, text_dim: int, *, lap_dim: int = 64,
                 head_hidden: int = 256, res_hidden: int = 256, mask_threshold: float = 0.35,
                 lap_geometry: bool = False, rec_detach: bool = False, attn_layers: list[int] = (),
                 cam: CrossModalAlignment | None = None, text_pool: str = "cls", mdetr: nn.Module | None = None,
                 score_threshold: float = 0.5, skip_dims: tuple[int, int] | None = None) -> None:
        super().__init__()
        if text_pool not in ("cls", "mean"):
            raise ValueError(f"text_pool must be cls or mean, got {text_pool!r}")
        self.text_pool = text_pool
        self.text = text
        self.vision = vision
        vis_dim = vision.embed_dim
        self.rec_head = None if mdetr is not None else RecHead(vis_dim, text_dim, k=lap_dim, hidden=head_hidden,
                                                               geometry=lap_geometry, detach=rec_detach)
        # skip_dims: widths of the stem's stride-8 / stride-4 maps that vision.tap_stem([8, 4]) keeps (model.res_skip)
        self.res_head = ResHead(vis_dim, None if mdetr is not None else text_dim, hidden=res_hidden,
                                skip_dims=skip_dims)
        self.mdetr = mdetr
        self.mask_threshold = mask_threshold
        # AttBalance's per-layer maps: a LAP map (own query/key) on each listed ViT block's tokens, for the
        # attention losses only (the box and mask come from the last block as before)
        self.attn_layers = [int(i) for i in attn_layers]
        self.layer_pools = nn.ModuleList(LanguageAdaptivePooling(vis_dim, text_dim, lap_dim) for _ in self.attn_layers)
        self.cam = cam
        self.score_threshold = score_threshold

    @property
    def multi(self) -> bool:
        """True with the multi-instance head (several boxes and masks per expression, or none)."""
        return self.mdetr is not None

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text(ids, mask)

    def pool_text(self, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The expression vector the heads read: [B,L,d_l] -> [B,d_l] ([CLS], or the mean with text_pool=mean)."""
        return text[:, 0] if self.text_pool == "cls" else masked_mean(text, mask)

    def forward(self, image: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                attn_only: bool = False) -> dict[str, torch.Tensor] | list[torch.Tensor]:
        """-> boxes [B,4] normalised cxcywh in the input frame, mask_logits [B,S,S], lap_attn [B,N] on the token
        grid (H, W) ("grid"), visual tokens [B,N,C], text features [B,L,d_l], pixel embeddings [B,C,S/4,S/4]
        ("pixel_emb"), and "attn_maps": the LAP maps the attention losses constrain (the head's first, then one
        per model.attn_layers block). `attn_only`: just that list (the momentum model's pass)."""
        text = self.encode_text(text_ids, text_mask)
        taps = {}
        visual, hw = self.vision(image, text, text_mask, taps=self.attn_layers or None, out=taps)
        if self.cam is not None:
            visual, text = self.cam(visual, hw, text, text_mask)
        skips = self.vision.stem_maps if self.res_head.skips is not None else None    # this pass's, from the hooks
        if self.mdetr is not None:  # pred_boxes [B,Q,4], pred_logits [B,Q,L+1], pred_masks [B,Q,S/4,S/4], ...
            pixel_emb = self.res_head.pixel_embeddings(visual, hw, skips)
            out = self.mdetr(visual, hw, text, text_mask, pixel_emb)
            return {**out, "grid": hw, "visual": visual, "text": text, "pixel_emb": pixel_emb}
        cls = self.pool_text(text, text_mask)
        layer_maps = [pool(taps[i], cls)[1] for i, pool in zip(self.attn_layers, self.layer_pools)]
        if attn_only:
            return [self.rec_head.attention(visual, cls)] + layer_maps
        boxes, attn = self.rec_head(visual, cls, hw)
        pixel_emb = self.res_head.pixel_embeddings(visual, hw, skips)
        mask_logits = self.res_head.logits(pixel_emb, cls, tuple(image.shape[-2:]))
        return {"boxes": boxes, "mask_logits": mask_logits, "lap_attn": attn, "grid": hw, "visual": visual,
                "text": text, "pixel_emb": pixel_emb, "attn_maps": [attn] + layer_maps}

    @torch.no_grad()
    def predict(self, image: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inference outputs in the input frame: boxes [B,4] cxcywh in [0,1], mask probabilities [B,S,S].
        Multi-instance head: boxes [B,Q,4], scores [B,Q] (1 - p(no object)) and mask_logits [B,Q,S/4,S/4]
        (query_mask_probs resizes the ones that are kept)."""
        out = self.forward(image, text_ids, text_mask)
        if self.mdetr is not None:
            from finetune.mdetr_head import query_scores

            return {"boxes": out["pred_boxes"].float(), "scores": query_scores(out["pred_logits"]),
                    "mask_logits": out["pred_masks"].float()}
        return {"boxes": out["boxes"].float(), "mask_probs": out["mask_logits"].float().sigmoid()}
