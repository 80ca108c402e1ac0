"""X-VLM's four objectives as plain functions: ITC (global batch), ITM hard-negative sampling + loss, MLM, box.

Each takes tensors and returns tensors; `PretrainTask` wires them to the encoders and weights them. Nothing here
synchronises with the host (no `.item()`, no boolean indexing), so a step runs without GPU stalls.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .box_ops import box_cxcywh_to_xyxy, elementwise_giou
from .gather import all_gather_with_grad, rank_and_world


def itc_loss(image_feat: Tensor, text_feat: Tensor, temp: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Symmetric InfoNCE of local rows against the GLOBAL batch of normalised features [B, e].

    Each rank's loss is the mean over its own B rows; with the gradient-carrying gather and data-parallel
    gradient averaging this is exactly the mean over the global batch, for any world size (no 1/world factor).
    Every rank must pass the same B. Returns (loss, local logits image->text [B, B], text->image [B, B]), the
    latter two detached, for ITM negative sampling.
    """
    rank, _ = rank_and_world()
    b = image_feat.shape[0]
    image_all = all_gather_with_grad(image_feat)
    text_all = all_gather_with_grad(text_feat)
    logits_i2t = image_feat @ text_all.t() / temp
    logits_t2i = text_feat @ image_all.t() / temp
    target = torch.arange(b, device=image_feat.device) + rank * b
    loss = (F.cross_entropy(logits_i2t, target) + F.cross_entropy(logits_t2i, target)) / 2
    local = slice(rank * b, (rank + 1) * b)
    return loss, logits_i2t[:, local].detach(), logits_t2i[:, local].detach()


@torch.no_grad()
def sample_hard_negatives(logits: Tensor) -> Tensor:
    """For each row i of a [B, B] similarity/temperature matrix, a column j != i drawn with weight
    softmax(row) + 1e-5 (X-VLM). Non-finite weights count as 0; a row left with no weight falls back to uniform
    over the other columns. One `torch.multinomial` call on the whole matrix; no host sync."""
    b = logits.shape[0]
    if b < 2 or logits.shape[1] != b:
        raise ValueError(f"hard negatives need a square similarity matrix with B >= 2, got {tuple(logits.shape)}")
    w = F.softmax(logits.float(), dim=1) + 1e-5
    w = torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0).clamp(min=0)
    eye = torch.eye(b, dtype=torch.bool, device=logits.device)
    w = w.masked_fill(eye, 0.0)
    empty = w.sum(dim=1, keepdim=True) <= 0
    w = torch.where(empty, (~eye).to(w.dtype), w)
    return torch.multinomial(w, 1).squeeze(1)


def itm_loss(logits: Tensor, num_pos: int) -> tuple[Tensor, Tensor]:
    """2-way matching loss over [3B, 2] logits ordered (B positives, 2B negatives); returns (loss, accuracy)."""
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    labels[:num_pos] = 1
    loss = F.cross_entropy(logits.float(), labels)
    acc = (logits.argmax(dim=1) == labels).float().mean()
    return loss, acc


def select_masked_positions(labels: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Up to k masked positions per row of MLM labels [B, L] (-100 = not masked) with fixed shapes.

    Returns (positions [B, k], their labels [B, k] (-100 where a row has fewer than k masks), fraction of rows
    with more than k masked tokens, whose extra masks are not scored). Fixed k avoids a host sync and keeps
    shapes static for torch.compile, and spares the vocabulary projection of unmasked tokens.
    """
    k = min(k, labels.shape[1])
    masked = labels != -100
    pos = torch.topk(masked.to(torch.float32), k, dim=1, sorted=False).indices
    overflow = (masked.sum(dim=1) > k).float().mean()
    return pos, labels.gather(1, pos), overflow


def mlm_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy of [..., V] logits at positions whose label is not -100; (loss, accuracy). 0 if none."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    labels = labels.reshape(-1)
    valid = labels != -100
    n = valid.sum().clamp(min=1)
    loss = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / n
    acc = ((logits.argmax(dim=1) == labels) & valid).sum() / n
    return loss, acc


def box_losses(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(L1, GIoU) losses of predicted vs target normalised (cx, cy, w, h) boxes [R, 4], means over boxes."""
    pred, target = pred.float(), target.float()
    l1 = (pred - target).abs().sum(dim=1).mean()
    giou = (1 - elementwise_giou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target))).mean()
    return l1, giou
