"""AttBalance's region attention constraint (RAC) on VG-LAW's language adaptive pooling attention.

LAP pools the visual tokens with one attention map A [B, H*W] (softmax over the token grid); the box is
regressed from that pooled vector alone, so the box can only be right once A sits on the referred object.
RAC supervises A directly with the ground-truth box (../shared/METHODS.md §5):

    L_rac = -log sum(A * M) - log(1 - sum(A * (1 - M)))

with M the box on the token grid. Here M is the *fraction of each patch cell the box covers* (a soft mask),
so a box smaller than one patch still marks the cells it touches (pretrain.concepts.box_patch_mask is
the binary X-VLM convention, a whole patch in or out, which would count a barely touched cell fully).

With several maps (the head's LAP map plus `model.attn_layers`' per-block maps) the paper weights layer i by
its Spearman correlation rho_i between in-box attention sum(A_i * M) and the predicted box's IoU:

    L_rac = sum_i rho'_i * (-log sum(A_i * M) - log(1 - sum(A_i * (1 - M)))),   rho'_i = rho_i - mean(rho) + 1

The paper measured rho on evaluation sets; here it is measured on each training batch (detached, no
gradient), so the weights follow the model as it trains. One map: rho' = 1.
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


def rac_per_sample(attn: torch.Tensor, boxes: torch.Tensor, hw: tuple[int, int],
                   eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """attn [B, H*W] (rows sum to 1), target boxes [B,4] normalised cxcywh -> (RAC per sample [B], in-box
    attention sum(A * M) [B])."""
    m = box_cell_coverage(boxes, hw)
    a = attn.float()
    inside = (a * m).sum(-1)
    outside = (a * (1.0 - m)).sum(-1)
    return -(inside + eps).log() - (1.0 - outside + eps).log(), inside


def rac_loss(attn: torch.Tensor, boxes: torch.Tensor, hw: tuple[int, int], eps: float = 1e-6) -> torch.Tensor:
    """attn [B, H*W] (rows sum to 1), target boxes [B,4] normalised cxcywh of the input frame -> mean RAC."""
    return rac_per_sample(attn, boxes, hw, eps)[0].mean()


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman's rho of two 1-D samples: the Pearson correlation of their ranks (ties: average ranks);
    0 when either is constant or there are fewer than two samples."""
    if x.numel() < 2:
        return x.new_zeros(())
    rx, ry = _ranks(x.float()), _ranks(y.float())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = (rx.square().sum() * ry.square().sum()).sqrt()
    return torch.where(den > 0, (rx * ry).sum() / den.clamp(min=1e-12), den.new_zeros(()))


def _ranks(v: torch.Tensor) -> torch.Tensor:
    """1-based ranks, tied values sharing the mean of their ranks."""
    less = (v[None, :] < v[:, None]).sum(1).float()
    equal = (v[None, :] == v[:, None]).sum(1).float()
    return less + (equal + 1) / 2


def rho_weights(inside: torch.Tensor, iou: torch.Tensor) -> torch.Tensor:
    """inside [M, B] in-box attention of M maps, iou [B] of the predicted boxes -> rho' [M] (detached):
    rho'_i = rho_i - mean(rho) + 1, rho_i = Spearman(inside_i, iou)."""
    rho = torch.stack([spearman(a.detach(), iou.detach()) for a in inside])
    return rho - rho.mean() + 1.0


def rac_multi(attns: list[torch.Tensor], boxes: torch.Tensor, hw: tuple[int, int],
              iou: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RAC over several maps on one grid: -> (per-sample sum_i rho'_i * RAC_i [B], rho' [M])."""
    per, inside = zip(*(rac_per_sample(a, boxes, hw) for a in attns))
    per, inside = torch.stack(per), torch.stack(inside)              # [M, B]
    w = rho_weights(inside, iou) if len(attns) > 1 else per.new_ones(1)
    return (w[:, None] * per).sum(0), w
