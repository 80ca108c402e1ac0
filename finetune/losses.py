"""VG-LAW's detection and segmentation losses (L1 + GIoU on the box, sigmoid focal + dice on the mask)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from pretrain.box_ops import box_cxcywh_to_xyxy, elementwise_giou


def box_losses_per_sample(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pred, target [B,4] normalised (cx,cy,w,h) -> L1 (summed over the 4 coordinates) and 1 - GIoU, [B] each."""
    pred, target = pred.float(), target.float()
    l1 = F.l1_loss(pred, target, reduction="none").sum(-1)
    giou = 1.0 - elementwise_giou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target))
    return l1, giou


def box_losses(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """pred, target [B,4] normalised (cx,cy,w,h) -> {"l1", "giou"}, each averaged over the batch."""
    l1, giou = box_losses_per_sample(pred, target)
    return {"l1": l1.mean(), "giou": giou.mean()}


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss averaged over all pixels (as the VG-LAW MindSpore port does)."""
    return sigmoid_focal_loss(logits.float(), target.float(), alpha=alpha, gamma=gamma, reduction="mean")


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per sample ([B,H,W] logits vs 0/1 target), averaged over the batch."""
    p = logits.float().sigmoid().flatten(1)
    t = target.float().flatten(1)
    dice = (2 * (p * t).sum(-1) + eps) / (p.sum(-1) + t.sum(-1) + eps)
    return (1.0 - dice).mean()
