"""AttBalance's region attention constraint (RAC) on VG-LAW's language adaptive pooling attention.

LAP pools the visual tokens with one attention map A [B, H*W] (softmax over the token grid); the box is
regressed from that pooled vector alone, so the box can only be right once A sits on the referred object.
RAC supervises A directly with the ground-truth box (../shared/METHODS.md §5):

    L_rac = -log sum(A * M) - log(1 - sum(A * (1 - M)))

with M the box on the token grid. Here M is the *fraction of each patch cell the box covers* (a soft mask),
so a box smaller than one patch still marks the cells it touches (pretrain.concepts.box_patch_mask is
the binary X-VLM convention, a whole patch in or out, which would count a barely touched cell fully). VG-LAW has a single LAP map, so the
per-layer Spearman re-weighting (rho') is 1 and is omitted.
"""
from __future__ import annotations

import torch


def box_cell_coverage(boxes: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Normalised (cx, cy, w, h) boxes [B,4] -> [B, H*W]: the fraction of each grid cell inside the box."""
    H, W = hw
    b = boxes.float()
    x0, x1 = b[:, 0] - b[:, 2] / 2, b[:, 0] + b[:, 2] / 2
    y0, y1 = b[:, 1] - b[:, 3] / 2, b[:, 1] + b[:, 3] / 2
    xs = torch.arange(W + 1, device=b.device, dtype=b.dtype) / W       # cell edges
    ys = torch.arange(H + 1, device=b.device, dtype=b.dtype) / H
    # overlap of [edge_j, edge_j+1] with [x0, x1], as a fraction of the cell width
    ox = (torch.minimum(xs[None, 1:], x1[:, None]) - torch.maximum(xs[None, :-1], x0[:, None])).clamp(min=0) * W
    oy = (torch.minimum(ys[None, 1:], y1[:, None]) - torch.maximum(ys[None, :-1], y0[:, None])).clamp(min=0) * H
    return (oy[:, :, None] * ox[:, None, :]).flatten(1)                  # [B, H*W] in [0, 1]


def rac_loss(attn: torch.Tensor, boxes: torch.Tensor, hw: tuple[int, int], eps: float = 1e-6) -> torch.Tensor:
    """attn [B, H*W] (rows sum to 1), target boxes [B,4] normalised cxcywh of the input frame -> mean RAC."""
    m = box_cell_coverage(boxes, hw)
    a = attn.float()
    inside = (a * m).sum(-1)
    outside = (a * (1.0 - m)).sum(-1)
    return (-(inside + eps).log() - (1.0 - outside + eps).log()).mean()
