"""Visual Genome -> shard items: region descriptions (kind "region") and objects (kind "object").

Object text is the first name with the first attribute prepended ("red car"), as X-VLM builds its VG
object data. Boxes are in the VG copy's pixels (``image_data.json`` width/height), which the writer scales
to the stored image. Entries whose image is not in ``image_data.json`` are orphans, counted and dropped.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from shards.build import Item
from shards.inputs import InputError, load_json, require_dir, require_keys
from shards.schema import make_key


def _image_id(path: Path, entry: dict, i: int, keys: tuple[str, ...]) -> int:
    for k in keys:
        if k in entry:
            return int(entry[k])
    raise InputError(path, f"entry {i} has none of the keys {', '.join(repr(k) for k in keys)}")


def _resolve(images_dir: Path, image_id: int, url: str | None) -> str:
    folder = url.rstrip("/").split("/")[-2] if url and url.count("/") >= 2 else None
    candidates = ([images_dir / folder / f"{image_id}.jpg"] if folder else []) + [
        images_dir / f"{image_id}.jpg", images_dir / "VG_100K" / f"{image_id}.jpg",
        images_dir / "VG_100K_2" / f"{image_id}.jpg"]
    for c in candidates:
        if c.is_file():
            return str(c)
    return str(candidates[0])


def vg_items(images_dir: str | Path, image_data_file: str | Path, regions_file: str | Path,
             objects_file: str | Path | None = None, exclude: set[int] | None = None
             ) -> tuple[list[Item], dict, dict]:
    """Items (sorted by VG image id), skip counts and extra counts for the vg converter."""
    images_dir = require_dir(images_dir)
    image_data_file, regions_file = Path(image_data_file), Path(regions_file)
    meta: dict[int, dict] = {}
    for i, e in enumerate(load_json(image_data_file, list)):
        require_keys(image_data_file, e, ("width", "height"), f"entry {i}")
        meta[_image_id(image_data_file, e, i, ("image_id", "id"))] = e
    skips: Counter = Counter()
    regions: dict[int, list[dict]] = {}
    for i, e in enumerate(load_json(regions_file, list)):
        iid = _image_id(regions_file, e, i, ("id", "image_id"))
        rs = e.get("regions")
        if not isinstance(rs, list):
            raise InputError(regions_file, f"entry {i} (image {iid}) has no 'regions' list")
        if iid not in meta:
            skips["orphan_image_entry"] += 1
            skips["region_orphan"] += len(rs)
            continue
        for j, r in enumerate(rs):
            require_keys(regions_file, r, ("phrase", "x", "y", "width", "height"), f"entry {i} regions[{j}]")
            regions.setdefault(iid, []).append(
                {"bbox": [r["x"], r["y"], r["width"], r["height"]], "text": r["phrase"], "kind": "region"})
    if objects_file is not None:
        objects_file = Path(objects_file)
        for i, e in enumerate(load_json(objects_file, list)):
            iid = _image_id(objects_file, e, i, ("image_id", "id"))
            objs = e.get("objects")
            if not isinstance(objs, list):
                raise InputError(objects_file, f"entry {i} (image {iid}) has no 'objects' list")
            if iid not in meta:
                skips["orphan_image_entry"] += 1
                skips["object_orphan"] += len(objs)
                continue
            for j, o in enumerate(objs):
                require_keys(objects_file, o, ("x", "y", "w", "h"), f"entry {i} objects[{j}]")
                names = o.get("names") or ([o["name"]] if o.get("name") else [])
                if not names:
                    skips["object_no_name"] += 1
                    continue
                attrs = [a for a in (o.get("attributes") or []) if isinstance(a, str) and a.strip()]
                text = f"{attrs[0].strip()} {names[0]}" if attrs else names[0]
                regions.setdefault(iid, []).append({"bbox": [o["x"], o["y"], o["w"], o["h"]], "text": text,
                                                    "kind": "object"})
    exclude = exclude or set()
    items = []
    for iid in sorted(meta):
        m = meta[iid]
        if m.get("coco_id") is not None and int(m["coco_id"]) in exclude:
            skips["excluded_refer"] += 1
            continue
        rec = {"source": "vg", "image_id": iid, "regions": regions.get(iid, [])}
        items.append(Item(key=make_key("vg", iid), image=_resolve(images_dir, iid, m.get("url")), record=rec,
                          ann_size=(int(m["width"]), int(m["height"]))))
    extra = {"images_in_image_data": len(meta),
             "images_with_coco_id": sum(1 for m in meta.values() if m.get("coco_id") is not None)}
    return items, dict(skips), extra
