"""Grounding metrics at the original image size, and the letterbox inverse that gets predictions there.

REC Prec@0.5: IoU >= 0.5 with *continuous* coordinates (boxes as real-valued [x, y, w, h], no +1 pixel
convention; SeqTR/SimVG use the same, refer/X-VLM add +1 to the intersection), so a box's IoU does not depend
on the image's pixel grid. RES: per expression I = |P & G| and U = |P | G| on the original pixel grid;
mIoU = mean of I/U, oIoU = sum I / sum U (weights large objects more), Prec@X = fraction with IoU >= X.
An expression whose prediction and ground truth are both empty has IoU 1 (nothing to find, nothing found).
Splits with several targets or none (gRefCOCO) also get finetune.grefcoco_metrics' gIoU, cIoU, N-acc, T-acc
and Prec@(F1=1, IoU>=0.5) under "grefcoco"; REC Prec@0.5 then counts the one-target expressions ("rec": "n").
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.box_ops import box_cxcywh_to_xyxy, box_xywh_to_xyxy, box_xyxy_to_xywh, elementwise_iou

MASK_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def box_iou_xywh(pred: Sequence[float] | torch.Tensor, gt: Sequence[float] | torch.Tensor) -> float:
    """Continuous IoU of two [x, y, w, h] boxes."""
    a = box_xywh_to_xyxy(torch.as_tensor(pred, dtype=torch.float64).reshape(1, 4))
    b = box_xywh_to_xyxy(torch.as_tensor(gt, dtype=torch.float64).reshape(1, 4))
    return float(elementwise_iou(a, b, eps=1e-12)[0])


def mask_inter_union(pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor) -> tuple[int, int]:
    """(|P & G|, |P | G|) of two boolean masks of the same shape."""
    p, g = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if p.shape != g.shape:
        raise ValueError(f"mask shapes differ: prediction {p.shape} vs ground truth {g.shape}")
    return int(np.logical_and(p, g).sum()), int(np.logical_or(p, g).sum())


def unletterbox_box(box: torch.Tensor, input_size: int | tuple[int, int], scale: float,
                    offset: Sequence[float], orig_hw: Sequence[int]) -> list[float]:
    """Normalised (cx,cy,w,h) in the letterboxed input -> [x, y, w, h] in original pixels, clipped to the image.

    The letterbox maps original pixels as input = original * scale + offset (offset = (pad_x, pad_y)).
    """
    ih, iw = (input_size, input_size) if isinstance(input_size, int) else input_size
    xyxy = box_cxcywh_to_xyxy(box.double().reshape(1, 4))[0] * torch.tensor([iw, ih, iw, ih], dtype=torch.float64)
    off = torch.tensor([offset[0], offset[1], offset[0], offset[1]], dtype=torch.float64)
    xyxy = (xyxy - off) / float(scale)
    h, w = int(orig_hw[0]), int(orig_hw[1])
    xyxy = torch.stack([xyxy[0].clamp(0, w), xyxy[1].clamp(0, h), xyxy[2].clamp(0, w), xyxy[3].clamp(0, h)])
    return [float(v) for v in box_xyxy_to_xywh(xyxy[None])[0]]


def unletterbox_mask(probs: torch.Tensor, scale: float, offset: Sequence[float], orig_hw: Sequence[int],
                     threshold: float = 0.35) -> np.ndarray:
    """Mask probabilities [S,S] on the letterboxed input -> boolean mask [h, w] of the original image.

    Each original pixel centre (x + 0.5, y + 0.5) lands at input coordinate (x + 0.5) * scale + pad_x; the
    probability is bilinearly sampled there (exact for any scale and fractional padding), then thresholded.
    """
    S_h, S_w = probs.shape[-2:]
    h, w = int(orig_hw[0]), int(orig_hw[1])
    dev = probs.device
    xs = ((torch.arange(w, device=dev, dtype=torch.float32) + 0.5) * scale + offset[0]) / S_w * 2 - 1
    ys = ((torch.arange(h, device=dev, dtype=torch.float32) + 0.5) * scale + offset[1]) / S_h * 2 - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)[None]            # [1, h, w, 2] as (x, y)
    out = F.grid_sample(probs.float().reshape(1, 1, S_h, S_w), grid, mode="bilinear", align_corners=False,
                        padding_mode="border")
    return (out[0, 0] > threshold).cpu().numpy()


def expression_record(pred_box_xywh: Sequence[float], gt_box_xywh: Sequence[float],
                      pred_mask: np.ndarray | None, gt_mask: np.ndarray | None) -> dict:
    """Per-expression scores: box IoU and, when both masks are given, mask intersection / union / IoU."""
    rec = {"box_iou": box_iou_xywh(pred_box_xywh, gt_box_xywh)}
    if pred_mask is not None and gt_mask is not None:
        inter, union = mask_inter_union(pred_mask, gt_mask)
        rec.update(inter=inter, union=union, mask_iou=inter / union if union else 1.0)
    return rec


def summarize(records: Iterable[dict]) -> dict:
    """Records of one split -> {"n", "rec": {"prec@0.5"}, "res": {"miou", "oiou", "prec@0.5" ... "prec@0.9"}}."""
    records = list(records)
    n = len(records)
    # generalised (gRefCOCO) records carry box_iou only when they have exactly one target
    box = np.array([r["box_iou"] for r in records if "box_iou" in r], dtype=np.float64)
    out: dict = {"n": n, "rec": {"prec@0.5": float((box >= 0.5).mean()) if len(box) else 0.0}}
    masked = [r for r in records if "mask_iou" in r]
    if masked:
        ious = np.array([r["mask_iou"] for r in masked], dtype=np.float64)
        inter = sum(int(r["inter"]) for r in masked)
        union = sum(int(r["union"]) for r in masked)
        res = {"miou": float(ious.mean()), "oiou": inter / union if union else 1.0}
        for t in MASK_THRESHOLDS:
            res[f"prec@{t}"] = float((ious >= t).mean())
        out["res"] = res
    from finetune.grefcoco_metrics import summarize_generalised

    gen = summarize_generalised(records)
    if gen is not None:         # several targets or none: gRefCOCO's metrics beside the usual ones
        out["grefcoco"] = gen
        if len(box) != n:
            out["rec"]["n"] = len(box)
    return out


def format_table(results: dict[str, dict]) -> str:
    """A readable table of {split: summarize(...)} results."""
    cols = ["n", "REC P@0.5", "mIoU", "oIoU"] + [f"P@{t}" for t in MASK_THRESHOLDS]
    rows = []
    for split, r in results.items():
        res = r.get("res", {})
        vals = [str(r["n"]), f"{100 * r['rec']['prec@0.5']:.2f}"]
        vals += [f"{100 * res[k]:.2f}" if k in res else "-" for k in ["miou", "oiou"]]
        vals += [f"{100 * res[f'prec@{t}']:.2f}" if res else "-" for t in MASK_THRESHOLDS]
        rows.append([split] + vals)
    header = ["split"] + cols
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    from finetune.grefcoco_metrics import format_grefcoco_table

    gen = format_grefcoco_table(results)
    return "\n".join([line(header)] + [line(row) for row in rows] + ([gen] if gen else []))
