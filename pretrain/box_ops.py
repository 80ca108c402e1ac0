"""Box conversions and overlap measures, as pure functions (DETR's util/box_ops.py, on torchvision.ops).

Conventions: `xyxy` = (x1, y1, x2, y2); `cxcywh` = (centre x, centre y, width, height), normalised to [0, 1]
inside the model; `xywh` = COCO's (x, y, w, h) as stored on disk. Pairwise functions return [N, M] matrices;
`elementwise_*` compare a[i] with b[i] (N vs N), which is what a matched box loss needs.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision import ops


def box_cxcywh_to_xyxy(b: Tensor) -> Tensor:
    return ops.box_convert(b, in_fmt="cxcywh", out_fmt="xyxy")


def box_xyxy_to_cxcywh(b: Tensor) -> Tensor:
    return ops.box_convert(b, in_fmt="xyxy", out_fmt="cxcywh")


def box_xywh_to_xyxy(b: Tensor) -> Tensor:
    return ops.box_convert(b, in_fmt="xywh", out_fmt="xyxy")


def box_xyxy_to_xywh(b: Tensor) -> Tensor:
    return ops.box_convert(b, in_fmt="xyxy", out_fmt="xywh")


def box_area(b: Tensor) -> Tensor:
    return ops.box_area(b)


def box_iou(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU [N, M] and union [N, M] of xyxy boxes (the union is what GIoU needs besides the IoU)."""
    area_a, area_b = ops.box_area(a), ops.box_area(b)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / union, union


def generalized_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise GIoU [N, M] of xyxy boxes (torchvision.ops.generalized_box_iou)."""
    return ops.generalized_box_iou(a, b)


def _elementwise_inter_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    lt = torch.max(a[..., :2], b[..., :2])
    rb = torch.min(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    union = ops.box_area(a.reshape(-1, 4)).reshape(a.shape[:-1]) + ops.box_area(b.reshape(-1, 4)).reshape(
        b.shape[:-1]) - inter
    return inter, union


def elementwise_iou(a: Tensor, b: Tensor, eps: float = 1e-7) -> Tensor:
    """IoU of a[i] with b[i] for xyxy boxes of the same shape [..., 4] -> [...]."""
    inter, union = _elementwise_inter_union(a, b)
    return inter / union.clamp(min=eps)


def elementwise_giou(a: Tensor, b: Tensor, eps: float = 1e-7) -> Tensor:
    """Generalised IoU of a[i] with b[i] (xyxy, [..., 4] -> [...]); in [-1, 1], 1 for identical boxes."""
    inter, union = _elementwise_inter_union(a, b)
    iou = inter / union.clamp(min=eps)
    lt = torch.min(a[..., :2], b[..., :2])
    rb = torch.max(a[..., 2:], b[..., 2:])
    hull = (rb - lt).clamp(min=0).prod(dim=-1)
    return iou - (hull - union) / hull.clamp(min=eps)
