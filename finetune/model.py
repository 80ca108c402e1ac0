"""The VG-LAW model: text encoder -> language adaptive ViT -> box and mask heads. No fusion module: the
expression enters the visual backbone through its qkv weights, and the heads through its [CLS] feature."""
from __future__ import annotations

import torch
from torch import nn

from finetune.backbone import LawViT
from finetune.heads import RecHead, ResHead


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the valid tokens: [B,L,D], [B,L] -> [B,D]."""
    m = mask.to(tokens.dtype)[..., None]
    return (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)


class VGLaw(nn.Module):
    """`text` maps (ids [B,L], mask [B,L]) to features [B,L,d_l]; `vision` is a LawViT."""

    def __init__(self, text: nn.Module, vision: LawViT, text_dim: int, *, lap_dim: int = 64,
                 head_hidden: int = 256, res_hidden: int = 256, mask_threshold: float = 0.35,
                 lap_geometry: bool = False, rec_detach: bool = False, text_pool: str = "cls") -> None:
        super().__init__()
        if text_pool not in ("cls", "mean"):
            raise ValueError(f"text_pool must be cls or mean, got {text_pool!r}")
        self.text_pool = text_pool
        self.text = text
        self.vision = vision
        vis_dim = vision.embed_dim
        self.rec_head = RecHead(vis_dim, text_dim, k=lap_dim, hidden=head_hidden, geometry=lap_geometry,
                                detach=rec_detach)
        self.res_head = ResHead(vis_dim, text_dim, hidden=res_hidden)
        self.mask_threshold = mask_threshold

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text(ids, mask)

    def forward(self, image: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """-> boxes [B,4] normalised cxcywh in the input frame, mask_logits [B,S,S], lap_attn [B,N] on the token
        grid (H, W) ("grid"), visual tokens [B,N,C], text features [B,L,d_l]."""
        text = self.encode_text(text_ids, text_mask)
        visual, hw = self.vision(image, text, text_mask)
        cls = text[:, 0] if self.text_pool == "cls" else masked_mean(text, text_mask)
        boxes, attn = self.rec_head(visual, cls, hw)
        mask_logits = self.res_head(visual, hw, cls, tuple(image.shape[-2:]))
        return {"boxes": boxes, "mask_logits": mask_logits, "lap_attn": attn, "grid": hw, "visual": visual,
                "text": text}

    @torch.no_grad()
    def predict(self, image: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inference outputs in the input frame: boxes [B,4] cxcywh in [0,1], mask probabilities [B,S,S]."""
        out = self.forward(image, text_ids, text_mask)
        return {"boxes": out["boxes"].float(), "mask_probs": out["mask_logits"].float().sigmoid()}
