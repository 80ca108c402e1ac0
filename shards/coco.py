"""COCO captions (+ optional instances) -> shard items: whole-image captions and object regions.

Object regions carry the category name as text (kind "object"). Crowd annotations (``iscrowd=1``) are
dropped and counted: their box covers a group of objects while the text names one ("person"), a wrong
pairing for region-text learning. 2014 (``COCO_train2014_%012d.jpg``) and 2017 (``%012d.jpg``) names both
resolve, whichever of the two image folders ``--images`` points at (the ids are the same numbers).
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from shards.build import Item
from shards.inputs import InputError, inside, load_json, require_dir, require_int, require_keys, require_list
from shards.schema import make_key


def load_coco_like(path: str | Path, *, categories: bool) -> tuple[dict[int, dict], list[dict], dict[int, str]]:
    """Images by id, annotations and (stripped) category names by id of a COCO-format JSON file."""
    data = load_json(path, dict)
    images: dict[int, dict] = {}
    for i, im in enumerate(require_list(path, data, "images")):
        require_keys(path, im, ("id", "file_name", "width", "height"), f"images[{i}]")
        iid = require_int(path, im, "id", f"images[{i}]")
        for k in ("width", "height"):
            require_int(path, im, k, f"images[{i}] (id {iid})", positive=True)
        if not isinstance(im["file_name"], str):
            raise InputError(path, f"images[{i}] (id {iid}): file_name {im['file_name']!r:.40} is not a string")
        if iid in images:
            raise InputError(path, f"images[{i}]: duplicate image id {iid}")
        images[iid] = im
    anns = require_list(path, data, "annotations")
    for i, a in enumerate(anns):
        if not isinstance(a, dict) or "image_id" not in a:
            raise InputError(path, f"annotations[{i}] lacks 'image_id'")
        require_int(path, a, "image_id", f"annotations[{i}]")
    cats: dict[int, str] = {}
    if categories:
        for i, c in enumerate(require_list(path, data, "categories")):
            require_keys(path, c, ("id", "name"), f"categories[{i}]")
            cid = require_int(path, c, "id", f"categories[{i}]")
            if not isinstance(c["name"], str) or not c["name"].strip():
                raise InputError(path, f"categories[{i}] (id {cid}): name {c['name']!r:.40} is not a non-empty string")
            if cid in cats:
                raise InputError(path, f"categories[{i}]: duplicate category id {cid}")
            cats[cid] = c["name"].strip()
    return images, anns, cats


def object_regions(path: str | Path, anns: list[dict], cats: dict[int, str], images: dict[int, dict],
                   skips: Counter) -> dict[int, list[dict]]:
    """Object regions by image id from COCO-style detection annotations (crowds and orphans counted)."""
    out: dict[int, list[dict]] = {}
    for i, a in enumerate(anns):
        require_keys(path, a, ("image_id", "category_id", "bbox"), f"annotations[{i}]")
        iid = a["image_id"]
        cid = require_int(path, a, "category_id", f"annotations[{i}]")
        if iid not in images:
            skips["object_orphan"] += 1
        elif a.get("iscrowd", 0):
            skips["object_crowd"] += 1
        elif cid not in cats:
            skips["object_unknown_category"] += 1
        else:
            out.setdefault(iid, []).append({"bbox": a["bbox"], "text": cats[cid],
                                            "kind": "object"})
    return out


def resolve_coco_image(images_dir: Path, file_name: str, image_id: int) -> str:
    """Path of a COCO image: the JSON's file name, else the other year's naming of the same id."""
    given = inside(images_dir, file_name)            # never a path outside --images (absolute or "..")
    base = inside(images_dir, os.path.basename(file_name))
    candidates = [c for c in (given, base) if c is not None] + [
        images_dir / f"{image_id:012d}.jpg", images_dir / f"COCO_train2014_{image_id:012d}.jpg",
        images_dir / f"COCO_val2014_{image_id:012d}.jpg"]
    for c in candidates:
        if c.is_file():
            return str(c)
    return str(candidates[0])  # missing: the writer counts it as image_missing


def coco_items(images_dir: str | Path, captions_file: str | Path, instances_file: str | Path | None = None,
               exclude: set[int] | None = None) -> tuple[list[Item], dict, dict]:
    """Items (sorted by image id), skip counts and extra counts for the coco converter."""
    images_dir = require_dir(images_dir)
    images, cap_anns, _ = load_coco_like(captions_file, categories=False)
    skips: Counter = Counter()
    captions: dict[int, list] = {}
    for i, a in enumerate(cap_anns):
        require_keys(captions_file, a, ("image_id", "caption"), f"annotations[{i}]")
        iid = a["image_id"]
        if iid not in images:
            skips["caption_orphan"] += 1
        else:
            captions.setdefault(iid, []).append(a["caption"])
    regions: dict[int, list[dict]] = {}
    if instances_file is not None:
        inst_images, inst_anns, cats = load_coco_like(instances_file, categories=True)
        for iid, im in inst_images.items():
            known = images.setdefault(iid, im)
            if (known["width"], known["height"]) != (im["width"], im["height"]):
                raise InputError(instances_file, f"image {iid} is {im['width']}x{im['height']} here but "
                                                 f"{known['width']}x{known['height']} in {captions_file}")
        regions = object_regions(instances_file, inst_anns, cats, images, skips)
    exclude = exclude or set()
    items = []
    for iid in sorted(images):
        if iid in exclude:
            skips["excluded_refer"] += 1
            continue
        im = images[iid]
        rec = {"source": "coco", "image_id": iid, "captions": captions.get(iid, []), "regions": regions.get(iid, [])}
        items.append(Item(key=make_key("coco", iid), image=resolve_coco_image(images_dir, im["file_name"], iid),
                          record=rec, ann_size=(im["width"], im["height"])))
    extra = {"images_in_annotations": len(images)}
    return items, dict(skips), extra
