"""X-VLM visual concepts: a box's feature from the patch tokens it covers, batched over all regions.

A region's token sequence is its image's full token sequence with a key-padding mask that keeps [CLS] and the
patches inside the box; its [CLS] is replaced by the mean of those patches (X-VLM, `vision_encoder(...,
idx_to_group_img, image_atts)`). Keeping every patch and masking (instead of gathering a ragged list) gives
fixed shapes and no Python loop over regions.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .box_ops import box_cxcywh_to_xyxy


def box_patch_mask(boxes: Tensor, grid: tuple[int, int]) -> Tensor:
    """[R, 4] normalised (cx, cy, w, h) -> bool [R, rows*cols]: the patches a box covers (at least one).

    As X-VLM's data code: columns floor(x1*cols) .. ceil(x2*cols) - 1, at least one column (same for rows).
    """
    rows, cols = grid
    xyxy = box_cxcywh_to_xyxy(boxes.float()).clamp(0, 1)

    def span(lo: Tensor, hi: Tensor, n: int) -> Tensor:
        start = (lo * n).floor().clamp(max=n - 1)
        stop = torch.maximum(start + 1, (hi * n).ceil().clamp(max=n))
        idx = torch.arange(n, device=boxes.device, dtype=start.dtype)
        return (idx >= start[:, None]) & (idx < stop[:, None])

    inside_x = span(xyxy[:, 0], xyxy[:, 2], cols)           # [R, cols]
    inside_y = span(xyxy[:, 1], xyxy[:, 3], rows)           # [R, rows]
    return (inside_y[:, :, None] & inside_x[:, None, :]).flatten(1)


def concept_tokens(image_tokens: Tensor, image_idx: Tensor, boxes: Tensor,
                   grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Concept sequences for R boxes over M images' tokens [M, 1+N, D].

    Returns (tokens [R, 1+N, D]: the box mean as [CLS] then all of the image's patches, key mask bool
    [R, 1+N]: [CLS] and the patches inside the box).
    """
    full = image_tokens[image_idx]
    inside = box_patch_mask(boxes, grid)                                   # [R, N]
    w = inside.to(full.dtype).unsqueeze(-1)
    cls = (full[:, 1:] * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)
    tokens = torch.cat([cls, full[:, 1:]], dim=1)
    key_mask = torch.cat([torch.ones_like(inside[:, :1]), inside], dim=1)
    return tokens, key_mask
