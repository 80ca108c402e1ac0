"""Language-blind references: what a grounding model scores if it ignores the expression.

Computed from the refer annotations themselves (a refs pickle + instances.json, as lichengunc/refer lays them
out), for the expressions of one split, with the evaluator's own IoU functions:

- `random_object`: the expected score of answering with one of the image's objects drawn at random (exact
  box and mask of that object): REC Prec@0.5 and mask IoU averaged over the objects, then over expressions.
- `largest_object`: always the largest object of the image.
- `all_objects`: the union of every object's mask (mIoU) and the box around every object (Prec@0.5).

A model whose Prec@0.5 / mIoU sit near these has not learnt to read the expression.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from finetune.metrics import box_iou_xywh
from shards.build import segmentation_to_rle
from shards.masks import decode_mask
from shards.refer import load_instances, load_refs, refs_path


def _ann_mask(ann: dict, h: int, w: int) -> np.ndarray:
    """The annotation's segmentation (polygons or RLE) as a bool mask at its image's size."""
    return decode_mask(segmentation_to_rle(ann["segmentation"], 1.0, 1.0, w, h))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / u) if u else 1.0


def _union_box(boxes: list[list[float]]) -> list[float]:
    x0 = min(b[0] for b in boxes)
    y0 = min(b[1] for b in boxes)
    x1 = max(b[0] + b[2] for b in boxes)
    y1 = max(b[1] + b[3] for b in boxes)
    return [x0, y0, x1 - x0, y1 - y0]


def language_blind_references(refer_root: str | Path, split: str, *, dataset: str = "refcoco",
                              split_by: str = "unc", by_kind=None, groupings=None) -> dict:
    """{"n", "random_object": {"rec", "miou"}, "largest_object": {...}, "all_objects": {...}} for every (ref, sentence) of `split`; with `by_kind` (sentence -> kind name) the same
    per kind under "kinds", and with `groupings` ({field: sentence -> group name or None}) per group under each field
    (one pass over the annotations for all of them; None leaves a sentence out of that field)."""
    root = Path(refer_root)
    refs = [r for r in load_refs(refs_path(root, dataset, split_by)) if r.get("split") == split]
    inst = load_instances(root / dataset / "instances.json")
    images = {int(im["id"]): im for im in inst["images"]}
    anns_of: dict[int, list[dict]] = defaultdict(list)
    ann_by_id = {}
    for a in inst["annotations"]:
        ann_by_id[int(a["id"])] = a
        if not a.get("iscrowd", 0):
            anns_of[int(a["image_id"])].append(a)
    fields = {**({"kinds": by_kind} if by_kind else {}), **(groupings or {})}
    per_image: dict[int, tuple[list[np.ndarray], np.ndarray]] = {}
    rows: list[tuple[str | None, dict[str, tuple[float, float]]]] = []
    for ref in refs:
        iid = int(ref["image_id"])
        im = images[iid]
        h, w = int(im["height"]), int(im["width"])
        objs = anns_of[iid]
        if iid not in per_image:
            masks = [_ann_mask(a, h, w) for a in objs]
            per_image[iid] = (masks, np.logical_or.reduce(masks) if masks else np.zeros((h, w), bool))
        masks, union = per_image[iid]
        target = ann_by_id[int(ref["ann_id"])]
        tmask = _ann_mask(target, h, w)
        tbox = target["bbox"]
        box_hits = [float(box_iou_xywh(a["bbox"], tbox) >= 0.5) for a in objs]
        mask_ious = [_iou(m, tmask) for m in masks]
        largest = int(np.argmax([a["area"] for a in objs]))
        scores = {
            "random_object": (float(np.mean(box_hits)), float(np.mean(mask_ious))),
            "largest_object": (box_hits[largest], mask_ious[largest]),
            "all_objects": (float(box_iou_xywh(_union_box([a["bbox"] for a in objs]), tbox) >= 0.5),
                            _iou(union, tmask)),
        }
        for sent in ref["sentences"]:
            text = (sent.get("sent") or sent.get("raw") or "") if isinstance(sent, dict) else str(sent)
            groups = {field: fn(text) for field, fn in fields.items()}
            rows.append((groups, scores))
    return _summarise(rows, list(fields))


def _summarise(rows: list[tuple[dict[str, str | None], dict[str, tuple[float, float]]]], fields: list[str]) -> dict:
    def mean(sel):
        if not sel:
            return {}
        names = sel[0][1].keys()
        return {k: {"rec": float(np.mean([s[k][0] for _, s in sel])), "miou": float(np.mean([s[k][1] for _, s in sel]))}
                for k in names}

    out = {"n": len(rows), **mean(rows)}
    for field in fields:
        groups = sorted({g[field] for g, _ in rows if g[field] is not None})
        if groups:
            out[field] = {k: {"n": sum(1 for g, _ in rows if g[field] == k), **mean([r for r in rows if r[0][field] == k])}
                          for k in groups}
    return out


def ref_targets(refer_root: str | Path, split: str, *, dataset: str = "refcoco",
                split_by: str = "unc") -> dict[int, tuple[int, int]]:
    """{ref_id: (image_id, ann_id)} for the refs of one split."""
    refs = load_refs(refs_path(Path(refer_root), dataset, split_by))
    return {int(r["ref_id"]): (int(r["image_id"]), int(r["ann_id"])) for r in refs if r.get("split") == split}


def distinct_answer_rate(rows: list[dict], targets: dict[int, tuple[int, int]]) -> dict:
    """How much the answers depend on the expression: over every pair of expressions on one image that name
    *different* objects, the fraction whose predicted boxes differ (IoU < 0.5 with each other). A model that
    ignores the expression answers each image the same way (rate 0); the ground truth scores 1 on the synthetic
    scenes (objects never overlap). `rows` are evaluation dump lines (ref_id, bbox [x, y, w, h])."""
    by_image: dict[int, list[tuple[int, list[float]]]] = defaultdict(list)
    for r in rows:
        image_id, ann_id = targets[int(r["ref_id"])]
        by_image[image_id].append((ann_id, r["bbox"]))
    pairs = differ = 0
    for answers in by_image.values():
        for i in range(len(answers)):
            for j in range(i + 1, len(answers)):
                if answers[i][0] != answers[j][0]:
                    pairs += 1
                    differ += box_iou_xywh(answers[i][1], answers[j][1]) < 0.5
    return {"pairs": pairs, "rate": differ / pairs if pairs else float("nan")}


def pooled_distinct_answers(dumps: list[tuple[Path, dict[int, tuple[int, int]]]]) -> dict:
    """`distinct_answer_rate` pooled over several evaluation dumps (each with its split's `ref_targets`);
    missing dumps are left out. {"pairs", "rate"} (rate None without pairs)."""
    import json

    pairs = differ = 0.0
    for dump, targets in dumps:
        if Path(dump).is_file():
            d = distinct_answer_rate([json.loads(x) for x in Path(dump).read_text().splitlines() if x.strip()],
                                     targets)
            if d["pairs"]:
                pairs, differ = pairs + d["pairs"], differ + d["rate"] * d["pairs"]
    return {"pairs": int(pairs), "rate": differ / pairs if pairs else None}
