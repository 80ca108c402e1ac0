"""VG-LAW's multi-task head: language adaptive pooling + MLP for the box (REC), transposed-conv upsampling +
per-pixel dot product with the expression's [CLS] feature for the mask (RES)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn


class LanguageAdaptivePooling(nn.Module):
    """One attention head: query from the text [CLS], keys from the visual tokens (both to k dims), values the
    raw visual tokens; softmax over positions."""

    def __init__(self, vis_dim: int, text_dim: int, k: int = 64) -> None:
        super().__init__()
        self.query = nn.Linear(text_dim, k)
        self.key = nn.Linear(vis_dim, k)
        self.scale = 1.0 / math.sqrt(k)

    def forward(self, visual: torch.Tensor, cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """visual [B,N,C], cls [B,d_l] -> pooled [B,C], attention [B,N] (sums to 1)."""
        logits = torch.einsum("bnk,bk->bn", self.key(visual), self.query(cls)) * self.scale
        attn = logits.float().softmax(-1).to(visual.dtype)
        return torch.einsum("bn,bnc->bc", attn, visual), attn


def attention_geometry(attn: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Moments of an attention map [B, H*W] over the token grid: mean x, mean y, std x, std y (normalised
    image coordinates of the cell centres) -> [B, 4]."""
    H, W = hw
    a = attn.float().view(-1, H, W)
    xs = (torch.arange(W, device=a.device, dtype=a.dtype) + 0.5) / W
    ys = (torch.arange(H, device=a.device, dtype=a.dtype) + 0.5) / H
    px, py = a.sum(1), a.sum(2)                                  # marginals [B,W], [B,H]
    mx, my = (px * xs).sum(-1), (py * ys).sum(-1)
    sx = ((px * (xs - mx[:, None]) ** 2).sum(-1) + 1e-6).sqrt()
    sy = ((py * (ys - my[:, None]) ** 2).sum(-1) + 1e-6).sqrt()
    return torch.stack([mx, my, sx, sy], -1)


def reference_boxes(geometry: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """LAP-map moments [B,4] (attention_geometry) -> the box they imply, normalised (cx, cy, w, h): the box over
    which the map's mass, spread evenly within each cell, would be uniform. A uniform spread over a width w has
    std w / sqrt(12); the cell-centre std misses the within-cell part (1 / (12 W^2)), so one cell gives w = 1/W
    and k adjacent cells k/W exactly."""
    H, W = hw
    mx, my, sx, sy = geometry.float().unbind(-1)
    w = (12.0 * sx ** 2 + 1.0 / W ** 2).sqrt()
    h = (12.0 * sy ** 2 + 1.0 / H ** 2).sqrt()
    return torch.stack([mx, my, w, h], -1).clamp(1e-4, 1.0 - 1e-4)


class RecHead(nn.Module):
    """LAP -> 3-layer MLP (C -> hidden -> hidden -> 4) -> sigmoid: box (cx, cy, w, h) in [0, 1].

    `geometry=True` reads the box from *where* the LAP map points: its moments give a reference box
    (reference_boxes) and the MLP, fed the pooled vector and that box, predicts a correction in logit space,
    box = sigmoid(logit(reference) + MLP(...)) (Deformable DETR's reference-point refinement); the last layer
    starts at zero, so training starts from the reference box, and the box losses reach the attention through
    the moments. VG-LAW regresses the box from the pooled token values alone, which needs tokens that still
    encode their absolute position after the backbone. A small backbone trained briefly does not: on the
    demo a linear probe recovers a token's x from its final feature with R^2 0.19, and the paper's head only
    learns the mean box, even while its LAP map's centroid already correlates 0.5 with the target centre
    (measured; feeding the moments in as four more MLP inputs did not help either). Off by default (the
    paper's head).

    `detach=True` stops the box losses' gradient at the head's inputs: the head learns to read the visual
    tokens and the [CLS] feature, and only the mask and Mask Grounding losses train the backbones. With the
    geometry head on a small backbone the box gradients through the LAP map cost the masks 0.08 mIoU; detached,
    the masks match the paper head's and the boxes are better too (demo config, measured in README)."""

    def __init__(self, vis_dim: int, text_dim: int, k: int = 64, hidden: int = 256, geometry: bool = False,
                 detach: bool = False) -> None:
        super().__init__()
        self.pool = LanguageAdaptivePooling(vis_dim, text_dim, k)
        self.geometry = geometry
        self.detach = detach
        self.mlp = nn.Sequential(nn.Linear(vis_dim + (4 if geometry else 0), hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 4))
        if geometry:
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def attention(self, visual: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """The LAP map alone [B,N] (what forward returns beside the boxes)."""
        if self.detach:
            visual, cls = visual.detach(), cls.detach()
        return self.pool(visual, cls)[1]

    def forward(self, visual: torch.Tensor, cls: torch.Tensor,
                hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """visual [B,N,C] on the token grid hw, cls [B,d_l] -> boxes [B,4], LAP attention [B,N]."""
        if self.detach:
            visual, cls = visual.detach(), cls.detach()
        pooled, attn = self.pool(visual, cls)
        if not self.geometry:
            return self.mlp(pooled).sigmoid(), attn
        ref = torch.special.logit(reference_boxes(attention_geometry(attn, hw), hw))
        delta = self.mlp(torch.cat([pooled, ref.to(pooled.dtype)], -1))
        return (ref + delta.float()).sigmoid().to(pooled.dtype), attn


class ResHead(nn.Module):
    """ConvT(C->hidden, 2, 2) -> LN -> GELU -> ConvT(hidden->C, 2, 2) gives pixel embeddings at 1/4 of the input
    (from /16 tokens); their dot product with the projected [CLS] is the mask logit, bilinearly resized to the
    input size.

    `skip_dims` (model.res_skip; off in VG-LAW): the conv stem's stride-8 and stride-4 feature maps of these widths
    are added after each upsampling step through 1x1 convs that start at zero (U-Net / FPN lateral connections),
    so training starts from the paper's head and the mask losses reach the stem's early layers directly."""

    def __init__(self, vis_dim: int, text_dim: int | None, hidden: int = 256,
                 skip_dims: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.up = nn.Sequential(nn.ConvTranspose2d(vis_dim, hidden, 2, 2), LayerNorm2d(hidden), nn.GELU(),
                                nn.ConvTranspose2d(hidden, vis_dim, 2, 2))
        # text_dim None: pixel embeddings only (the multi-instance head's queries take the [CLS] vector's place)
        self.text_proj = nn.Linear(text_dim, vis_dim) if text_dim is not None else None
        self.skips = None
        if skip_dims is not None:
            self.skips = nn.ModuleList([nn.Conv2d(skip_dims[0], hidden, 1), nn.Conv2d(skip_dims[1], vis_dim, 1)])
            for conv in self.skips:
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)

    def pixel_embeddings(self, visual: torch.Tensor, hw: tuple[int, int],
                         skips: list[torch.Tensor] | None = None) -> torch.Tensor:
        """visual [B,N,C] on grid hw -> pixel embeddings [B,C,4H,4W] (CAL and the multi-instance head read them
        too). `skips`: the stride-8 and stride-4 maps [B,c,2H,2W], [B,c',4H,4W] when the head has skip_dims."""
        B, _, C = visual.shape
        x = visual.transpose(1, 2).reshape(B, C, hw[0], hw[1])
        if self.skips is None:
            return self.up(x)
        if skips is None or len(skips) != 2:
            raise ValueError("ResHead with skip connections needs the stride-8 and stride-4 stem maps")
        up1, norm, act, up2 = self.up
        x = up1(x) + self.skips[0](skips[0].to(x.dtype))
        return up2(act(norm(x))) + self.skips[1](skips[1].to(x.dtype))

    def logits(self, fmap: torch.Tensor, cls: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """pixel embeddings [B,C,h,w], cls [B,d_l] -> mask logits [B, *out_size]."""
        logits = torch.einsum("bchw,bc->bhw", fmap, self.text_proj(cls)) / math.sqrt(fmap.shape[1])
        return F.interpolate(logits[:, None], size=out_size, mode="bilinear", align_corners=False)[:, 0]

    def forward(self, visual: torch.Tensor, hw: tuple[int, int], cls: torch.Tensor,
                out_size: tuple[int, int]) -> torch.Tensor:
        """visual [B,N,C] on grid hw, cls [B,d_l] -> mask logits [B, *out_size]."""
        return self.logits(self.pixel_embeddings(visual, hw), cls, out_size)
