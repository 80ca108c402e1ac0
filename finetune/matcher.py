"""Hungarian matching of object queries to an expression's targets (DETR / MDETR), with the cost matrix
computed for the whole batch at once; only scipy's assignment runs per sample.

    cost[b, q, t] = cost_token * -(p_q . positive_t) + cost_l1 * |box_q - box_t|_1 + cost_giou * -GIoU(box_q, box_t)

where p_q is query q's distribution over the expression's token positions (soft token prediction) and
positive_t the target's uniform map over the tokens that name it (MDETR's class cost).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from pretrain.box_ops import box_cxcywh_to_xyxy, elementwise_giou


def match_cost(pred_boxes: torch.Tensor, token_prob: torch.Tensor, tgt_boxes: torch.Tensor,
               positive: torch.Tensor, *, cost_token: float = 1.0, cost_l1: float = 5.0,
               cost_giou: float = 2.0) -> torch.Tensor:
    """pred_boxes [B,Q,4] and tgt_boxes [B,T,4] normalised (cx,cy,w,h); token_prob [B,Q,L(+1)] (a trailing
    "no object" column is ignored); positive [B,T,L] -> cost [B,Q,T] (padding targets give finite garbage:
    the caller ignores them)."""
    L = positive.shape[-1]
    pred, tgt = pred_boxes.float(), tgt_boxes.float()
    c_tok = -torch.einsum("bql,btl->bqt", token_prob[..., :L].float(), positive.float())
    c_l1 = torch.cdist(pred, tgt, p=1)
    giou = elementwise_giou(box_cxcywh_to_xyxy(pred)[:, :, None], box_cxcywh_to_xyxy(tgt)[:, None, :])
    return cost_token * c_tok + cost_l1 * c_l1 - cost_giou * giou


def hungarian_match(cost: torch.Tensor, n_targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cost [B,Q,T] (sample b's targets are its first n_targets[b] columns) -> (batch, query, target) index
    tensors of the minimum-cost one-to-one assignment of every target (Q >= n_targets[b]) to a query."""
    c = np.nan_to_num(cost.detach().float().cpu().numpy(), nan=1e6, posinf=1e6, neginf=-1e6)
    n = n_targets.tolist()
    bs, qs, ts = [], [], []
    for b, k in enumerate(n):               # the assignment itself is per sample (scipy has no batched form)
        if k == 0:
            continue
        if k > c.shape[1]:
            raise ValueError(f"sample {b} has {k} targets but only {c.shape[1]} queries")
        r, t = linear_sum_assignment(c[b, :, :k])
        bs.append(np.full(len(r), b))
        qs.append(r)
        ts.append(t)
    cat = (lambda xs: torch.as_tensor(np.concatenate(xs), dtype=torch.long, device=cost.device)
           if xs else torch.zeros(0, dtype=torch.long, device=cost.device))
    return cat(bs), cat(qs), cat(ts)
