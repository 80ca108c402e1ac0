"""The multi-instance head's losses (MDETR), after Hungarian matching (finetune/matcher.py):

- boxes: L1 + GIoU of the matched queries (finetune.losses.box_losses), averaged over matched pairs;
- soft token prediction: cross-entropy between each query's distribution over [tokens..., no object] and its
  target: uniform over the expression's tokens for a matched query, "no object" for every other query (all of
  them for a no-target expression), the latter weighted by `no_object` (DETR's eos_coef); normalised by the
  sum of the weights (DETR's weighted cross-entropy; MDETR divides by the number of boxes);
- contrastive alignment (MDETR's ContrastiveCriterion, tau 0.07): query -> tokens and token -> queries InfoNCE
  with several positives (the mean positive logit against the log-sum-exp over all candidates, padding tokens
  excluded), halved and normalised by the number of matched queries; no-target expressions have no positives;
- masks: sigmoid focal + dice (finetune.losses) of the matched queries' masks, upsampled to the target size;
- query selection (model.mdetr.select): binary cross-entropy of each visual token's score against the fraction
  of its grid cell the targets cover (soft labels; a no-target expression covers nothing), mean over tokens.

Without phrase annotations every target of an expression is named by the whole expression, so its positive
token map is uniform over the expression's word tokens ([CLS], [SEP] and padding excluded).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from finetune.losses import box_losses, dice_loss, focal_loss
from finetune.matcher import hungarian_match, match_cost


def positive_token_map(ids: torch.Tensor, mask: torch.Tensor, special_ids: Sequence[int]) -> torch.Tensor:
    """[B,L] uniform weights over each expression's word tokens (sum 1; [CLS] alone if it has none)."""
    special = torch.isin(ids, torch.as_tensor(list(special_ids), device=ids.device, dtype=ids.dtype))
    words = mask.bool() & ~special
    words[:, 0] |= ~words.any(1)
    w = words.float()
    return w / w.sum(1, keepdim=True)


def contrastive_align(query_align: torch.Tensor, token_align: torch.Tensor, positive: torch.Tensor,
                      text_mask: torch.Tensor, temperature: float, num: float) -> torch.Tensor:
    """query_align [B,Q,A], token_align [B,L,A] (normalised), positive [B,Q,L] bool, text_mask [B,L]."""
    logits = torch.einsum("bqa,bla->bql", query_align.float(), token_align.float()) / temperature
    pos_sum = (logits * positive).sum
    valid_tok = text_mask.bool()[:, None, :]
    q2t_neg = logits.masked_fill(~valid_tok, float("-inf")).logsumexp(2)          # [B,Q]
    n_q = positive.sum(2)
    q2t = (q2t_neg - pos_sum(2) / n_q.clamp(min=1)).masked_fill(n_q == 0, 0.0).sum()
    t2q_neg = logits.logsumexp(1)                                                 # [B,L]
    n_t = positive.sum(1)
    t2q = (t2q_neg - pos_sum(1) / n_t.clamp(min=1)).masked_fill(n_t == 0, 0.0).sum()
    return (q2t + t2q) / 2 / max(num, 1.0)


def mdetr_losses(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], *, special_ids: Sequence[int],
                 cost_token: float = 1.0, cost_l1: float = 5.0, cost_giou: float = 2.0, no_object: float = 0.1,
                 temperature: float = 0.07, focal_alpha: float = 0.25, focal_gamma: float = 2.0
                 ) -> dict[str, torch.Tensor]:
    """-> {"l1", "giou", "token", "align", "focal", "dice"} for the head's outputs (MdetrHead.forward) and a
    batch with boxes [B,K,4], n_targets [B], target_masks [B,K,S,S], text_ids / text_mask [B,L]."""
    boxes, logits = out["pred_boxes"], out["pred_logits"].float()
    B, Q, L1 = logits.shape
    L = L1 - 1
    ids, tmask = batch["text_ids"], batch["text_mask"]
    pos = positive_token_map(ids, tmask, special_ids)                              # [B,L]
    K = batch["boxes"].shape[1]
    cost = match_cost(boxes.detach(), logits.detach().softmax(-1), batch["boxes"], pos[:, None].expand(B, K, L),
                      cost_token=cost_token, cost_l1=cost_l1, cost_giou=cost_giou)
    b, q, t = hungarian_match(cost, batch["n_targets"])
    M = int(b.numel())
    zero = boxes.sum() * 0.0
    terms = box_losses(boxes[b, q], batch["boxes"][b, t]) if M else {"l1": zero, "giou": zero}

    target = torch.zeros_like(logits)
    target[..., L] = 1.0
    weight = torch.full((B, Q), no_object, device=logits.device)
    if M:
        target[b, q] = F.pad(pos[b], (0, 1))
        weight[b, q] = 1.0
    ce = -(target * logits.log_softmax(-1)).sum(-1)
    terms["token"] = (ce * weight).sum() / weight.sum().clamp(min=1e-6)

    positive = torch.zeros(B, Q, L, dtype=torch.bool, device=logits.device)
    if M:
        positive[b, q] = pos[b] > 0
    terms["align"] = contrastive_align(out["query_align"], out["token_align"], positive, tmask, temperature, M)

    if M:
        size = batch["target_masks"].shape[-2:]
        pm = F.interpolate(out["pred_masks"][b, q][:, None].float(), size=size, mode="bilinear",
                           align_corners=False)[:, 0]
        tm = batch["target_masks"][b, t].float()
        terms["focal"] = focal_loss(pm, tm, focal_alpha, focal_gamma)
        terms["dice"] = dice_loss(pm, tm)
    else:
        terms["focal"] = terms["dice"] = out["pred_masks"].sum() * 0.0
    return terms


def selection_loss(scores: torch.Tensor, union_mask: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """scores [B,N] (logits, row-major grid hw), union_mask [B,S,S] (every target's pixels) -> scalar."""
    cover = F.adaptive_avg_pool2d(union_mask[:, None].float(), hw).flatten(1)
    return F.binary_cross_entropy_with_logits(scores.float(), cover)
