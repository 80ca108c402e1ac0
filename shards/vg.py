"""Visual Genome -> shard items: region descriptions (kind "region") and objects (kind "object").

Object text is the first name with the first attribute prepended ("red car"), as X-VLM builds its VG
object data. Boxes are in the VG copy's pixels (``image_data.json`` width/height), which the writer scales
to the stored image. Entries whose image is not in ``image_data.json`` are orphans, counted and dropped.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from shards.build import Item
from shards.inputs import InputError, is_plain_name, load_json, require_dir, require_int, require_keys
from shards.schema import make_key


def _image_id(path: Path, entry: dict, i: int, keys: tuple[str, ...]) -> int:
    if not isinstance(entry, dict):
        raise InputError(path, f"entry {i} is not an object")
    for k in keys:
        if k in entry:
            return require_int(path, entry, k, f"entry {i}")
    raise InputError(path, f"entry {i} has none of the keys {', '.join(repr(k) for k in keys)}")


def _strings(v: object) -> list[str]:
    """A name/attribute field as a list of non-empty strings: VG has both "car" and ["car"] (and nulls)."""
    items = [v] if isinstance(v, str) else v if isinstance(v, list) else []
    return [x.strip() for x in items if isinstance(x, str) and x.strip()]


def _resolve(images_dir: Path, image_id: int, url: str | None) -> str:
    folder = url.rstrip("/").split("/")[-2] if isinstance(url, str) and url.count("/") >= 2 else None
    if folder is not None and not is_plain_name(folder):
        folder = None                        # never a path from the JSON ("..", "/abs")
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
        iid = _image_id(image_data_file, e, i, ("image_id", "id"))
        for k in ("width", "height"):
            require_int(image_data_file, e, k, f"entry {i} (image {iid})", positive=True)
        if e.get("coco_id") is not None:
            require_int(image_data_file, e, "coco_id", f"entry {i} (image {iid})")
        if iid in meta:
            raise InputError(image_data_file, f"entry {i}: duplicate image id {iid}")
        meta[iid] = e
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
                names = _strings(o.get("names")) or _strings(o.get("name"))
                if not names:
                    skips["object_no_name"] += 1
                    continue
                attrs = _strings(o.get("attributes"))
                text = f"{attrs[0]} {names[0]}" if attrs else names[0]
                regions.setdefault(iid, []).append({"bbox": [o["x"], o["y"], o["w"], o["h"]], "text": text,
                                                    "kind": "object"})
    exclude = exclude or set()
    items = []
    for iid in sorted(meta):
        m = meta[iid]
        if m.get("coco_id") is not None and m["coco_id"] in exclude:
            skips["excluded_refer"] += 1
            continue
        rec = {"source": "vg", "image_id": iid, "regions": regions.get(iid, [])}
        items.append(Item(key=make_key("vg", iid), image=_resolve(images_dir, iid, m.get("url")), record=rec,
                          ann_size=(m["width"], m["height"])))
    extra = {"images_in_image_data": len(meta),
             "images_with_coco_id": sum(1 for m in meta.values() if m.get("coco_id") is not None)}
    return items, dict(skips), extra
