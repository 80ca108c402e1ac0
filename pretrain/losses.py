"""X-VLM's four objectives as plain functions: ITC (global batch), ITM hard-negative sampling + loss, MLM, box.

Each takes tensors and returns tensors; `PretrainTask` wires them to the encoders and weights them. Nothing here
synchronises with the host (no `.item()`, no boolean indexing), so a step runs without GPU stalls.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .box_ops import box_cxcywh_to_xyxy, elementwise_giou
from .gather import all_gather_no_grad, all_gather_with_grad, rank_and_world


@torch.no_grad()
def same_text(text_ids: Tensor) -> Tensor:
    """[B, world * B] bool: local text i has exactly the token ids of global text j (padding included; every rank
    pads to the same length, data.max_tokens).

    Synthetic region captions repeat within a batch ("red triangle" for two red triangles; two thirds of the demo's
    region texts share their caption with another one), and real captions do too ("a man"). A pair whose texts are
    identical is a match both ways, so it must be neither an ITC negative nor an ITM hard negative: counted as a
    negative, it is a wrong label (this text does not match its own kind of image). Measured on the demo at 400
    steps (held-out pairs): no change yet in ITM (constant either way) or region R@1 (0.36 vs 0.35)."""
    every = all_gather_no_grad(text_ids)
    return (text_ids[:, None, :] == every[None, :, :]).all(dim=-1)


def itc_loss(image_feat: Tensor, text_feat: Tensor, temp: Tensor, valid: Tensor | None = None,
             duplicate: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Symmetric InfoNCE of local rows against the GLOBAL batch of normalised features [B, e].

    The loss is normalised so that, with the gradient-carrying gather and data-parallel gradient averaging
    (mean over ranks), value and gradient are exactly those of the mean over the global batch, for any world
    size (no 1/world factor). `valid` [B] (bool) marks real pairs: padding repeats (the loader repeats region
    texts to a fixed count) are neither rows of the loss nor negatives of other rows. Every rank must pass the
    same B. `duplicate` [B, world * B] (bool, `same_text`) marks columns that also match a row (identical
    texts): they are left out of that row's negatives. Returns (loss, local logits image->text [B, B],
    text->image [B, B]), the latter two detached.
    """
    rank, world = rank_and_world()
    b = image_feat.shape[0]
    image_all = all_gather_with_grad(image_feat)
    text_all = all_gather_with_grad(text_feat)
    logits_i2t = image_feat @ text_all.t() / temp
    logits_t2i = text_feat @ image_all.t() / temp
    target = torch.arange(b, device=image_feat.device) + rank * b
    if valid is None and duplicate is None:
        loss = (F.cross_entropy(logits_i2t, target) + F.cross_entropy(logits_t2i, target)) / 2
    else:
        keep = F.one_hot(target, logits_i2t.shape[1]).bool()
        others = torch.ones_like(keep) if duplicate is None else ~duplicate
        if valid is not None:
            valid_all = all_gather_with_grad(valid.to(image_feat.dtype)).detach() > 0
            others = others & valid_all[None, :]
        keep = keep | others
        rows = (F.cross_entropy(logits_i2t.masked_fill(~keep, float("-inf")), target, reduction="none")
                + F.cross_entropy(logits_t2i.masked_fill(~keep, float("-inf")), target, reduction="none")) / 2
        if valid is None:
            loss = rows.mean()
        else:   # mean over the valid rows of the global batch; x world because gradients get averaged over ranks
            loss = (rows * valid).sum() * world / valid_all.sum().clamp(min=1)
    local = slice(rank * b, (rank + 1) * b)
    return loss, logits_i2t[:, local].detach(), logits_t2i[:, local].detach()


@torch.no_grad()
def sample_hard_negatives(logits: Tensor, valid: Tensor | None = None,
                          duplicate: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """For each row i of a [B, B] similarity/temperature matrix, a column j != i drawn with weight
    softmax(row) + 1e-5 (X-VLM), among the `valid` columns only (padding repeats would be false negatives) and
    not the columns `duplicate` [B, B] marks for that row (identical texts, `same_text`: not negatives).
    Non-finite weights count as 0. One `torch.multinomial` call on the whole matrix; no host sync.

    Returns (column per row [B], ok [B] bool): a row with no usable column falls back to a uniform draw over
    the other columns and gets ok=False, so the caller leaves that negative out of the loss.
    """
    b = logits.shape[0]
    if b < 2 or logits.shape[1] != b:
        raise ValueError(f"hard negatives need a square similarity matrix with B >= 2, got {tuple(logits.shape)}")
    w = F.softmax(logits.float(), dim=1) + 1e-5
    w = torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0).clamp(min=0)
    eye = torch.eye(b, dtype=torch.bool, device=logits.device)
    banned = eye if valid is None else eye | ~valid.bool()[None, :]
    if duplicate is not None:
        banned = banned | duplicate
    w = w.masked_fill(banned, 0.0)
    ok = w.sum(dim=1) > 0
    w = torch.where(ok[:, None], w, (~eye).to(w.dtype))
    return torch.multinomial(w, 1).squeeze(1), ok


def weighted_mean(x: Tensor, weight: Tensor | None) -> Tensor:
    """Mean of x, or its weighted mean (0 when all weights are 0) without a host sync."""
    if weight is None:
        return x.mean()
    weight = weight.to(x.dtype)
    return (x * weight).sum() / weight.sum().clamp(min=1e-6)


def itm_loss(logits: Tensor, num_pos: int, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """2-way matching loss over [3B, 2] logits ordered (B positives, 2B negatives), optionally weighted per
    pair [3B]; returns (loss, accuracy)."""
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    labels[:num_pos] = 1
    loss = weighted_mean(F.cross_entropy(logits.float(), labels, reduction="none"), weight)
    acc = weighted_mean((logits.argmax(dim=1) == labels).float(), weight)
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


def box_losses(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(L1, GIoU) losses of predicted vs target normalised (cx, cy, w, h) boxes [R, 4], (weighted) means
    over boxes; L1 summed over the 4 coordinates as in X-VLM."""
    pred, target = pred.float(), target.float()
    l1 = weighted_mean((pred - target).abs().sum(dim=1), weight)
    giou = weighted_mean(1 - elementwise_giou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target)), weight)
    return l1, giou
