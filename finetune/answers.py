"""A model's answer to one expression in original-image pixels, for either head, and its score record.

    ans = one_box_answer(...)  /  query_answer(...)      # {"bboxes", "scores", "masks", "mask", "none",
                                                         #  "top_box", "top_mask"}
    rec = score_answer(ans, gt)                          # finetune.metrics / finetune.grefcoco_metrics fields

The one-instance head (vglaw) always answers one box and one mask; it says "no target" when its mask is
empty. The multi-instance head (mdetr) answers with every query whose score reaches its threshold (boxes and
masks; "no target" when there is none, the merged mask of the kept queries as its mask) and, on one-target
(refer) expressions, with its top-scoring query's box and mask, as MDETR's RefCOCO evaluation takes the top box.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from finetune.grefcoco_metrics import generalised_record
from finetune.metrics import box_iou_xywh, expression_record, unletterbox_box, unletterbox_mask
from shards.masks import decode_mask


def one_box_answer(box: torch.Tensor, mask_probs: torch.Tensor, input_size, scale: float, offset: Sequence[float],
                   orig_hw: Sequence[int], threshold: float) -> dict:
    b = unletterbox_box(box.cpu(), input_size, scale, offset, orig_hw)
    m = unletterbox_mask(mask_probs, scale, offset, orig_hw, threshold)
    return {"bboxes": [b], "scores": [1.0], "masks": [m], "mask": m, "none": not m.any(), "top_box": b, "top_mask": m}


def query_answer(boxes: torch.Tensor, scores: torch.Tensor, mask_logits: torch.Tensor, input_size: tuple[int, int],
                 scale: float, offset: Sequence[float], orig_hw: Sequence[int], score_threshold: float,
                 threshold: float) -> dict:
    """boxes [Q,4] normalised cxcywh, scores [Q], mask_logits [Q,h,w] (1/4 of the input) of one expression."""
    order = scores.float().argsort(descending=True).tolist()
    kept = [i for i in order if float(scores[i]) >= score_threshold]

    def mask_of(i: int) -> np.ndarray:     # as ResHead: logits resized to the input, then the probability
        up = F.interpolate(mask_logits[i][None, None].float(), size=tuple(input_size), mode="bilinear",
                           align_corners=False)[0, 0]
        return unletterbox_mask(up.sigmoid(), scale, offset, orig_hw, threshold)

    masks = [mask_of(i) for i in kept]
    merged = np.logical_or.reduce(masks) if masks else np.zeros((int(orig_hw[0]), int(orig_hw[1])), dtype=bool)
    box = lambda i: unletterbox_box(boxes[i].cpu(), input_size, scale, offset, orig_hw)  # noqa: E731
    top = order[0]
    return {"bboxes": [box(i) for i in kept], "scores": [float(scores[i]) for i in kept], "masks": masks,
            "mask": merged, "none": not kept, "top_box": box(top), "top_mask": masks[0] if kept else mask_of(top)}


def merged_gt_mask(gt: dict) -> np.ndarray | None:
    """A generalised ref's merged target mask (zeros for no target); None when a target has no mask."""
    h, w = gt["size"]
    if gt["no_target"]:
        return np.zeros((h, w), dtype=bool)
    if not all(gt["masks"]):
        return None
    return np.logical_or.reduce([decode_mask(m).astype(bool) for m in gt["masks"]])


def score_answer(ans: dict, gt: dict) -> dict:
    """The record of one answer against GroundingDataset.target(i): the usual box/mask IoU for a one-target ref;
    gRefCOCO's fields for a generalised ref (plus box_iou of the top box when it has exactly one target)."""
    if gt.get("generalised"):
        gt_mask = merged_gt_mask(gt)
        rec = generalised_record(ans["bboxes"], gt["bboxes"], ans["none"], ans["mask"] if gt_mask is not None else None,
                                 gt_mask)
        if len(gt["bboxes"]) == 1:
            rec["box_iou"] = box_iou_xywh(ans["top_box"], gt["bboxes"][0])
        return rec
    gt_mask = decode_mask(gt["mask"]) if gt.get("mask") else None
    return expression_record(ans["top_box"], gt["bbox"], ans["top_mask"] if gt_mask is not None else None, gt_mask)
