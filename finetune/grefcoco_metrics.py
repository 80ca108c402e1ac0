"""gRefCOCO's generalised metrics (GRES and GREC; DATA_FORMATS.md "gRefCOCO") from per-expression records.

An expression names several objects or none. Per expression the model answers with a set of boxes (those above
its score threshold), a merged mask, and whether it says "no target" (`pred_none`). Records hold:
    gt_none, pred_none, n_gt, n_pred, tp   and   inter, union, mask_iou (merged masks, original pixels)
(gt_none: the expression has no target; predictions files call the predicted one `no_target`)
RES (GRES): a no-target expression answered with "no target" scores IoU 1 with I = U = 0; answered otherwise
it scores IoU 0 (even with an empty mask) and adds its mask to the union; a target expression answered with "no target" scores I = 0.
Otherwise these are the per-expression I and U of the (forced-empty) predicted mask against the (possibly
empty) merged ground truth, so:
    gIoU = mean per-expression IoU,   cIoU = sum I / sum U,
    N-acc = no-target expressions answered "no target" / no-target expressions,
    T-acc = target expressions not answered "no target" / target expressions.
REC (GREC): Prec@(F1=1, IoU>=0.5) counts an expression as correct when the F1 of its predicted boxes against
the target boxes is 1 (every target matched one-to-one by a prediction with IoU >= 0.5 and no prediction left
over), a no-target expression when no box is predicted. TP is the *maximum* one-to-one matching at IoU >= 0.5
(scipy's linear_sum_assignment on the thresholded IoU), so the count does not depend on the order of the boxes;
a greedy matcher can only find fewer. rec_n_acc: no-target expressions with no box predicted.
Every metric is a function of the gathered records alone, so it is exact under any number of ranks.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from pretrain.box_ops import box_iou, box_xywh_to_xyxy

F1_KEY = "prec@f1=1,iou>=0.5"


def matched_pairs(pred_xywh: Sequence[Sequence[float]], gt_xywh: Sequence[Sequence[float]],
                  thr: float = 0.5) -> int:
    """The largest number of one-to-one (prediction, target) pairs with IoU >= thr."""
    if not len(pred_xywh) or not len(gt_xywh):
        return 0
    p = box_xywh_to_xyxy(torch.as_tensor(pred_xywh, dtype=torch.float64).reshape(-1, 4))
    g = box_xywh_to_xyxy(torch.as_tensor(gt_xywh, dtype=torch.float64).reshape(-1, 4))
    iou, _ = box_iou(p, g)
    hit = (torch.nan_to_num(iou, nan=0.0) >= thr).numpy()
    r, c = linear_sum_assignment(-hit.astype(np.float64))
    return int(hit[r, c].sum())


def generalised_record(pred_boxes: Sequence[Sequence[float]], gt_boxes: Sequence[Sequence[float]],
                       pred_none: bool, pred_mask: np.ndarray | None, gt_mask: np.ndarray | None) -> dict:
    """One expression's GREC/GRES record (boxes [x, y, w, h] and boolean masks in original pixels; gt_mask is
    the targets' merged mask, all zeros for no target; the prediction's mask is forced empty when pred_none)."""
    from finetune.metrics import mask_inter_union

    rec = {"gt_none": not len(gt_boxes), "pred_none": bool(pred_none), "n_gt": len(gt_boxes),
           "n_pred": len(pred_boxes), "tp": matched_pairs(pred_boxes, gt_boxes)}
    if pred_mask is not None and gt_mask is not None:
        inter, union = mask_inter_union(np.zeros_like(gt_mask) if pred_none else pred_mask, gt_mask)
        # a no-target expression not answered "no target" scores 0 even when its predicted mask is empty
        iou = inter / union if union else 1.0 if pred_none or not rec["gt_none"] else 0.0
        rec.update(inter=inter, union=union, mask_iou=iou)
    return rec


def _mean(xs: list) -> float | None:
    return float(np.mean(xs)) if xs else None


def summarize_generalised(records: Iterable[dict]) -> dict | None:
    """{"n", "no_target", "multi_target", "giou", "ciou", "n_acc", "t_acc", F1_KEY, "rec_n_acc"} over the
    generalised records (those with "gt_none"); None when there are none. A metric without expressions to
    count (N-acc on a split with no no-target expression) is None."""
    gen = [r for r in records if "gt_none" in r]
    if not gen:
        return None
    none = [r for r in gen if r["gt_none"]]
    some = [r for r in gen if not r["gt_none"]]
    correct = [(r["n_pred"] == 0) if r["gt_none"] else (r["tp"] == r["n_gt"] == r["n_pred"]) for r in gen]
    out = {"n": len(gen), "no_target": len(none), "multi_target": sum(r["n_gt"] > 1 for r in gen),
           "n_acc": _mean([r["pred_none"] for r in none]), "t_acc": _mean([not r["pred_none"] for r in some]),
           F1_KEY: _mean(correct), "rec_n_acc": _mean([r["n_pred"] == 0 for r in none])}
    masked = [r for r in gen if "mask_iou" in r]
    if masked:
        union = sum(int(r["union"]) for r in masked)
        out["giou"] = _mean([r["mask_iou"] for r in masked])
        out["ciou"] = sum(int(r["inter"]) for r in masked) / union if union else 1.0
    return out


def format_grefcoco_table(results: dict[str, dict]) -> str:
    """The generalised metrics of {split: result} as a table (splits without them are left out)."""
    cols = ["n", "no-target", "multi", "gIoU", "cIoU", "N-acc", "T-acc", "F1=1@0.5", "REC N-acc"]
    keys = ["n", "no_target", "multi_target", "giou", "ciou", "n_acc", "t_acc", F1_KEY, "rec_n_acc"]
    rows = []
    for split, r in results.items():
        g = r.get("grefcoco")
        if g:
            rows.append([split] + [str(g[k]) if k in ("n", "no_target", "multi_target") else
                                   "-" if g.get(k) is None else f"{100 * g[k]:.2f}" for k in keys])
    if not rows:
        return ""
    header = ["split (gRefCOCO)"] + cols
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in [header] + rows)
