"""Objects365 (v1 or v2, COCO-like JSON) -> object-region items.

``file_name`` prefixes rarely match the extracted layout (v2 says ``images/v1/patch8/x.jpg``; users have
``patch8/x.jpg`` or a flat folder), so the image is found by its patch folder and basename, whatever the
prefix. Images that are listed but not on disk (v2 lists three that its archives lack) are counted as
``image_missing``. Categories are mapped by id (v1 train and val order them differently), names stripped.
The JSON is read whole: the 2020 train file needs tens of GB of RAM, so split it per patch first.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path, PurePosixPath

from shards.build import Item
from shards.coco import load_coco_like, object_regions
from shards.inputs import inside, is_plain_name, require_dir
from shards.schema import make_key


def resolve_objects365_image(images_dir: Path, file_name: str) -> Path | None:
    """The image on disk for a JSON ``file_name``: as given, then ``patchN/<name>``, then flat."""
    p = PurePosixPath(file_name)
    patch = next((part for part in reversed(p.parts[:-1]) if part.startswith("patch")), None)
    candidates = [inside(images_dir, file_name)]          # never a path outside --images
    if patch and is_plain_name(patch):
        candidates.append(inside(images_dir, f"{patch}/{p.name}"))
    candidates += [inside(images_dir, p.name), inside(images_dir / "images", file_name)]
    for c in candidates:
        if c is not None and c.is_file():
            return c
    return None


def objects365_items(images_dir: str | Path, annotations_file: str | Path) -> tuple[list[Item], dict, dict]:
    """Items (sorted by image id), skip counts and extra counts for the objects365 converter."""
    images_dir = require_dir(images_dir)
    images, anns, cats = load_coco_like(annotations_file, categories=True)
    skips: Counter = Counter()
    regions = object_regions(annotations_file, anns, cats, images, skips)
    items = []
    for iid in sorted(images):
        im = images[iid]
        path = resolve_objects365_image(images_dir, str(im["file_name"]))
        if path is None:
            skips["image_missing"] += 1
            continue
        rec = {"source": "objects365", "image_id": iid, "regions": regions.get(iid, [])}
        items.append(Item(key=make_key("objects365", iid), image=str(path), record=rec,
                          ann_size=(im["width"], im["height"])))
    return items, dict(skips), {"images_in_annotations": len(images), "categories": len(cats)}
