"""`python -m shards synthetic`: draw a small CLEVR-Ref+-like scene dataset and write it in the *real* raw
formats (COCO 2017, Visual Genome 1.2, img2dataset webdataset output, Objects365 v2, lichengunc/refer), so
the demo and the tests run the real converters on it.

    out/coco/annotations/{captions,instances}_train2017.json   out/coco/train2017/%012d.jpg
    out/vg/{image_data,region_descriptions,objects}.json        out/vg/VG_100K/<id>.jpg
    out/cc3m/00000.tar  00000.parquet  00000_stats.json
    out/objects365/zhiyuan_objv2_train.json                     out/objects365/patch{0,1}/*.jpg
    out/refer/refcoco/{refs(unc).p,instances.json}              out/refer/images/train2014/COCO_train2014_%012d.jpg
    out/refer/grefcoco/{grefs(unc).json,instances.json}         (gRefCOCO layout, the same refer images)

The grefcoco set (gRefCOCO's format, see shards.refer) holds, per refer image and in that image's split,
up to two multi-target refs ("all the red shapes", "the two circles left of the star"), one no-target ref
("the green star" when there is none) and one single-target ref, drawn from their own random stream so the
other datasets do not change with it. The refer images are a subset of the COCO images (same ids, same bytes) and the first half of the VG images
are COCO images too (`coco_id`), so `--exclude-refer` has real work to do. Every file is a pure function of
the seed: JSON key order, JPEG quality, tar headers and the pickle protocol are fixed.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pycocotools import mask as mask_utils

from shards.inputs import InputError
from shards.synthetic_scene import COLORS, IMAGE_SIZES, SHAPES, Scene, render, sample_scene
from shards.synthetic_text import (captions, multi_target_expressions, no_target_expressions, referring_expressions,
                                   region_phrases)

DEFAULT_IMAGES = 320
JPEG_QUALITY = 90
# unc-like image splits (70/10/10/10), ordered so that even a tiny dataset gets every split.
SPLIT_PATTERN = ("train", "val", "train", "testA", "train", "testB", "train", "train", "train", "train")
# testA/testB hold only refs to one shape family each, like unc's people / other objects.
FAMILIES = {"testA": ("circle", "square"), "testB": ("triangle", "star", "diamond")}
MAX_REFS_PER_IMAGE = 4
# COCO-like category ids with COCO's own gaps (12, 26, 29, 30 are absent), one category per colour+shape.
_COCO_GAPS = {12, 26, 29, 30}
SYNSETS = {"circle": "circle.n.01", "square": "square.n.01", "triangle": "triangle.n.01",
           "star": "star.n.03", "diamond": "diamond.n.02"}
LICENSES = [
    {"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1,
     "name": "Attribution-NonCommercial-ShareAlike License"},
    {"url": "http://creativecommons.org/licenses/by-nc/2.0/", "id": 2, "name": "Attribution-NonCommercial License"},
    {"url": "http://creativecommons.org/licenses/by/2.0/", "id": 4, "name": "Attribution License"},
]
_STREAMS = {"coco": 1, "vg": 2, "cc3m": 3, "objects365": 4, "grefcoco": 5}
MULTI_REFS_PER_IMAGE = 2        # grefcoco: multi-target refs per image (at most), + 1 no-target + 1 single-target
_TAR_MTIME = 1_600_000_000


class SyntheticArgumentError(InputError, ValueError):
    """A bad argument to `generate` (the CLI prints it as one line, exit code 2)."""


def _rng(seed: int, stream: str, index: int) -> np.random.Generator:
    # One generator per (stream, image): an image does not change when `images` grows.
    return np.random.default_rng([seed, _STREAMS[stream], index])


def coco_categories() -> list[dict]:
    """30 colour+shape categories with gapped ids, supercategory = shape."""
    cats, cid = [], 1
    for shape in SHAPES:
        for color in COLORS:
            while cid in _COCO_GAPS:
                cid += 1
            cats.append({"supercategory": shape, "id": cid, "name": f"{color} {shape}"})
            cid += 1
    return cats


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _write_json(path: Path, obj: Any, indent: int | None = None) -> None:
    text = json.dumps(obj, indent=indent, separators=None if indent else (",", ":"))
    _write(path, text.encode("utf-8"))


def _poly_area(polygon: list[float], h: int, w: int) -> float:
    """Mask area as pycocotools rasterises the polygon (what COCO's `area` holds)."""
    return float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects([polygon], h, w))))


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO ground-truth crowd RLE: run lengths over the column-major (Fortran) flattening, zeros first."""
    flat = np.asfortranarray(mask.astype(np.uint8)).reshape(-1, order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _pick_refs(scene: Scene, split: str, rng: np.random.Generator) -> list[tuple[int, list[tuple[str, str]]]]:
    family = FAMILIES.get(split)
    out = []
    for t, obj in enumerate(scene.objects):
        if family is not None and obj.shape not in family:
            continue
        exprs = referring_expressions(scene.objects, t, scene.side, rng)
        if exprs:
            out.append((t, exprs))
        if len(out) == MAX_REFS_PER_IMAGE:
            break
    return out


def _coco_scene(seed: int, k: int, split: str | None, crowd: bool):
    """COCO image k (refer images must get at least one valid ref of their split's family)."""
    rng = _rng(seed, "coco", k)
    for _ in range(1000):
        scene = sample_scene(rng, crowd=crowd)
        refs = _pick_refs(scene, split, rng) if split else []
        if split is None or refs:
            return scene, refs, rng
    raise RuntimeError(f"no referable scene for COCO image {k} after 1000 draws")  # never seen


def generate(out_dir: str | Path, seed: int = 0, images: int | None = None) -> dict:
    """Write all synthetic raw datasets under out_dir; returns summary counts.

    `images` is the number of COCO images (default 320); 60% of them are refer images, VG and CC3M get
    3/4 as many images and Objects365 half as many.
    """
    n_coco = DEFAULT_IMAGES if images is None else int(images)
    if n_coco < 8:
        raise SyntheticArgumentError("--images", f"must be at least 8 (got {n_coco})")
    out = Path(out_dir)
    n_refer = max(6, round(0.6 * n_coco))
    coco_ids = [100_000 + 1_009 * k for k in range(n_coco)]
    scenes: list[Scene] = []
    jpegs: list[bytes] = []
    caps: list[list[str]] = []
    refer: list[tuple[str, list]] = []
    for k in range(n_coco):
        split = SPLIT_PATTERN[k % len(SPLIT_PATTERN)] if k < n_refer else None
        scene, refs, rng = _coco_scene(seed, k, split, crowd=k >= n_coco - 2)
        jpegs.append(_jpeg(render(scene, rng)))
        caps.append(captions(scene, rng))
        scenes.append(scene)
        if split:
            refer.append((split, refs))
    summary: dict[str, Any] = {"seed": seed, "out": str(out)}
    ann_ids = _write_coco(out / "coco", coco_ids, scenes, jpegs, caps, summary)
    _write_refer(out / "refer", coco_ids[:n_refer], scenes[:n_refer], jpegs[:n_refer], refer, ann_ids, summary)
    _write_grefcoco(out / "refer", seed, coco_ids[:n_refer], scenes[:n_refer], [s for s, _ in refer], ann_ids, summary)
    _write_vg(out / "vg", seed, max(4, n_coco * 3 // 4), coco_ids, scenes, jpegs, summary)
    _write_img2dataset(out / "cc3m", seed, max(4, n_coco * 3 // 4), summary)
    _write_objects365(out / "objects365", seed, max(4, n_coco // 2), summary)
    return summary


def _image_entry(image_id: int, scene: Scene, file_name: str, url: str) -> dict:
    return {"license": 1 + image_id % 2, "file_name": file_name, "coco_url": url, "height": scene.height,
            "width": scene.width, "date_captured": "2013-11-14 16:28:13",
            "flickr_url": f"http://farm4.staticflickr.com/{image_id}.jpg", "id": image_id}


def _write_coco(root: Path, ids: list[int], scenes: list[Scene], jpegs: list[bytes], caps: list[list[str]],
                summary: dict) -> list[list[int]]:
    """COCO 2017 captions + instances; returns the annotation ids of each image's objects (in order)."""
    cats = {c["name"]: c["id"] for c in coco_categories()}
    images, cap_anns, inst_anns, ann_ids = [], [], [], []
    cap_id, ann_id, crowd_id = 1, 200_000, 900_100_000_000
    for image_id, scene, data, cs in zip(ids, scenes, jpegs, caps):
        _write(root / "train2017" / f"{image_id:012d}.jpg", data)
        name = f"{image_id:012d}.jpg"
        images.append(_image_entry(image_id, scene, name, f"http://images.cocodataset.org/train2017/{name}"))
        for c in cs:
            cap_anns.append({"image_id": image_id, "id": cap_id, "caption": c})
            cap_id += 1
        mine = []
        for o in scene.objects:
            poly = list(o.polygon)
            inst_anns.append({"segmentation": [poly], "area": _poly_area(poly, scene.height, scene.width),
                              "iscrowd": 0, "image_id": image_id, "bbox": o.bbox,
                              "category_id": cats[o.label], "id": ann_id})
            mine.append(ann_id)
            ann_id += 7  # ids are not contiguous in COCO either
        ann_ids.append(mine)
        if scene.crowd:
            rles = mask_utils.frPyObjects([list(o.polygon) for o in scene.crowd], scene.height, scene.width)
            m = mask_utils.decode(mask_utils.merge(rles))
            rle = _uncompressed_rle(m)
            box = mask_utils.toBbox(mask_utils.frPyObjects(rle, *rle["size"])).tolist()
            inst_anns.append({"segmentation": rle, "area": int(m.sum()), "iscrowd": 1, "image_id": image_id,
                              "bbox": [round(v, 2) for v in box], "category_id": cats[scene.crowd[0].label],
                              "id": crowd_id})
            crowd_id += 1
    info = {"description": "Synthetic shapes (COCO 2017 layout)", "url": "", "version": "1.0", "year": 2017,
            "contributor": "shards.synthetic", "date_created": "2017/09/01"}
    ann = root / "annotations"
    _write_json(ann / "captions_train2017.json",
                {"info": info, "licenses": LICENSES, "images": images, "annotations": cap_anns})
    _write_json(ann / "instances_train2017.json", {"info": info, "licenses": LICENSES, "images": images,
                                                   "annotations": inst_anns, "categories": coco_categories()})
    summary["coco"] = {"images": len(images), "captions": len(cap_anns),
                       "objects": sum(a["iscrowd"] == 0 for a in inst_anns),
                       "crowd": sum(a["iscrowd"] == 1 for a in inst_anns), "categories": len(cats)}
    return ann_ids


def _write_refer(root: Path, ids: list[int], scenes: list[Scene], jpegs: list[bytes], refer: list,
                 ann_ids: list[list[int]], summary: dict) -> None:
    """refer layout: refcoco/refs(unc).p (protocol 2, like refer's Python-2 pickles) + instances.json."""
    cats = {c["name"]: c["id"] for c in coco_categories()}
    images, anns, refs = [], [], []
    ref_id, sent_id = 0, 0
    counts: dict[str, dict[str, int]] = {}
    for image_id, scene, data, (split, picked), aids in zip(ids, scenes, jpegs, refer, ann_ids):
        name = f"COCO_train2014_{image_id:012d}.jpg"
        _write(root / "images" / "train2014" / name, data)
        images.append(_image_entry(image_id, scene, name, f"http://mscoco.org/images/{image_id}"))
        for o, aid in zip(scene.objects, aids):
            poly = list(o.polygon)
            anns.append({"segmentation": [poly], "area": _poly_area(poly, scene.height, scene.width),
                         "iscrowd": 0, "image_id": image_id, "bbox": o.bbox, "category_id": cats[o.label],
                         "id": aid})
        c = counts.setdefault(split, {"images": 0, "refs": 0, "sentences": 0})
        c["images"] += 1
        for t, exprs in picked:
            sents = [{"tokens": s.split(), "raw": raw, "sent_id": sent_id + i, "sent": s}
                     for i, (raw, s) in enumerate(exprs)]
            # refcoco's file_name suffix is NOT the ann_id (a trap for readers); mimic that.
            refs.append({"image_id": image_id, "split": split, "sentences": sents,
                         "file_name": f"COCO_train2014_{image_id:012d}_{ref_id + 1}.jpg",
                         "category_id": cats[scene.objects[t].label], "ann_id": aids[t],
                         "sent_ids": [s["sent_id"] for s in sents], "ref_id": ref_id})
            ref_id += 1
            sent_id += len(sents)
            c["refs"] += 1
            c["sentences"] += len(sents)
    info = {"description": "Synthetic shapes (refer layout)", "version": "1.0", "year": 2014}
    _write_json(root / "refcoco" / "instances.json", {"info": info, "licenses": LICENSES, "images": images,
                                                       "annotations": anns, "categories": coco_categories()})
    _write(root / "refcoco" / "refs(unc).p", pickle.dumps(refs, protocol=2))
    # {split: {images, refs, sentences}, "non_train_images": n} (tests of the converters read this layout)
    summary["refcoco"] = dict(sorted(counts.items()))
    summary["refcoco"]["non_train_images"] = len({r["image_id"] for r in refs if r["split"] != "train"})


def _sentences(exprs: list[tuple[str, str]], first_id: int) -> list[dict]:
    return [{"tokens": s.split(), "raw": raw, "sent_id": first_id + i, "sent": s} for i, (raw, s) in enumerate(exprs)]


def _write_grefcoco(root: Path, seed: int, ids: list[int], scenes: list[Scene], splits: list[str],
                    ann_ids: list[list[int]], summary: dict) -> None:
    """gRefCOCO layout: grefcoco/grefs(unc).json (ann_id a list, [-1] and no_target for none) + instances.json
    (the refcoco one: same images, same annotations)."""
    cats = {c["name"]: c["id"] for c in coco_categories()}
    refs: list[dict] = []
    counts: dict[str, dict[str, int]] = {}
    sent_id = 0
    for k, (image_id, scene, split, aids) in enumerate(zip(ids, scenes, splits, ann_ids)):
        rng = _rng(seed, "grefcoco", k)
        picked: list[tuple[list[int], list[tuple[str, str]]]] = []
        picked += multi_target_expressions(scene.objects, scene.side, rng, refs=MULTI_REFS_PER_IMAGE)
        none = no_target_expressions(scene.objects, rng)
        if none:
            picked.append(([], none))
        singles = [(t, e) for t in rng.permutation(len(scene.objects)).tolist()
                   if (e := referring_expressions(scene.objects, t, scene.side, rng, k=2))][:1]
        picked += [([t], e) for t, e in singles]
        c = counts.setdefault(split, {"images": 0, "refs": 0, "sentences": 0, "multi_target": 0, "no_target": 0})
        c["images"] += 1
        for targets, exprs in picked:
            sents = _sentences(exprs, sent_id)
            refs.append({"image_id": image_id, "split": split, "sentences": sents,
                         "file_name": f"COCO_train2014_{image_id:012d}.jpg",
                         "category_id": [cats[scene.objects[t].label] for t in targets] or [-1],
                         "ann_id": [aids[t] for t in targets] or [-1], "no_target": not targets,
                         "sent_ids": [s["sent_id"] for s in sents], "ref_id": len(refs)})
            sent_id += len(sents)
            c["refs"] += 1
            c["sentences"] += len(sents)
            c["multi_target"] += len(targets) > 1
            c["no_target"] += not targets
    _write_json(root / "grefcoco" / "grefs(unc).json", refs)
    _write(root / "grefcoco" / "instances.json", (root / "refcoco" / "instances.json").read_bytes())
    summary["grefcoco"] = dict(sorted(counts.items()))


def _write_vg(root: Path, seed: int, n: int, coco_ids: list[int], coco_scenes: list[Scene],
              coco_jpegs: list[bytes], summary: dict) -> None:
    """VG 1.2: the first half of the images are COCO images (coco_id set, same pixels)."""
    n_linked = min(n // 2, len(coco_ids))
    image_data, regions, objects = [], [], []
    region_id, object_id = 1_000, 5_000
    quirks = {"orphan_region_images": 1, "regions_out_of_image": 0, "regions_zero_area": 0}
    for j in range(n):
        vg_id = j + 1
        rng = _rng(seed, "vg", j)
        if j < n_linked:
            scene, data, coco_id = coco_scenes[j], coco_jpegs[j], coco_ids[j]
        else:
            scene = sample_scene(rng)
            data, coco_id = _jpeg(render(scene, rng)), None
        folder = "VG_100K" if j % 5 else "VG_100K_2"
        _write(root / folder / f"{vg_id}.jpg", data)
        image_data.append({"width": scene.width, "url": f"https://cs.stanford.edu/people/rak248/{folder}/{vg_id}.jpg",
                           "height": scene.height, "image_id": vg_id, "coco_id": coco_id,
                           "flickr_id": 7_000_000 + vg_id if j % 3 == 0 else None})
        regs = []
        for phrase, (x, y, w, h) in region_phrases(scene, rng):
            phrase = phrase + " " if rng.random() < 0.15 else phrase.capitalize() if rng.random() < 0.2 else phrase
            regs.append({"region_id": region_id, "width": int(round(w)), "height": int(round(h)),
                         "image_id": vg_id, "phrase": phrase, "y": int(round(y)), "x": int(round(x))})
            region_id += 1
        if j == 0:  # real VG quirks: a box running past the image edge and a zero-width box
            regs.append({"region_id": region_id, "width": scene.width, "height": 20, "image_id": vg_id,
                         "phrase": "the whole bottom edge", "y": scene.height - 10, "x": 5})
            regs.append({"region_id": region_id + 1, "width": 0, "height": 15, "image_id": vg_id,
                         "phrase": "a thin line", "y": 3, "x": 3})
            region_id += 2
            quirks["regions_out_of_image"] += 1
            quirks["regions_zero_area"] += 1
        regions.append({"regions": regs, "id": vg_id})
        objs = []
        for o in scene.objects:
            x, y, w, h = (int(round(v)) for v in o.bbox)
            entry = {"synsets": [SYNSETS[o.shape]], "h": h, "object_id": object_id, "merged_object_ids": [],
                     "names": [o.shape], "w": w, "y": y, "x": x}
            if rng.random() < 0.6:  # VG: the attributes key is absent on objects that have none
                entry["attributes"] = [o.color, o.size] if rng.random() < 0.5 else [o.color]
            objs.append(entry)
            object_id += 1
        obj_entry = {"image_id": vg_id, "objects": objs}
        if j % 2 == 0:
            obj_entry["image_url"] = image_data[-1]["url"]
        objects.append(obj_entry)
    # Like image 27 in the real data: regions for an image that image_data.json does not list.
    regions.append({"regions": [{"region_id": region_id, "width": 30, "height": 30, "image_id": n + 1000,
                                 "phrase": "an orphan region", "y": 10, "x": 10}], "id": n + 1000})
    _write_json(root / "image_data.json", image_data)
    _write_json(root / "region_descriptions.json", regions)
    _write_json(root / "objects.json", objects)
    summary["vg"] = {"images": n, "with_coco_id": n_linked,
                     "regions": sum(len(r["regions"]) for r in regions),
                     "objects": sum(len(o["objects"]) for o in objects), **quirks}


def _border_resize(img: Image.Image, size: int = 256) -> Image.Image:
    """img2dataset's default resize_mode=border: fit the longer side to `size`, pad to a white square."""
    scale = size / max(img.size)
    w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    out = Image.new("RGB", (size, size), (255, 255, 255))
    out.paste(img.resize((w, h), Image.Resampling.LANCZOS), ((size - w) // 2, (size - h) // 2))
    return out


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), _TAR_MTIME, 0o644
    info.uname = info.gname = "bigdata"
    tar.addfile(info, io.BytesIO(data))


def _write_img2dataset(root: Path, seed: int, n: int, summary: dict) -> None:
    """One img2dataset shard (webdataset output format, default 256 px border resize): the tar holds the
    successes only, the parquet one row per input row (failures included)."""
    root.mkdir(parents=True, exist_ok=True)
    prefixes = ("", "illustration of ", "vector image of ", "stock photo of ")
    rows: list[dict] = []
    with tarfile.open(root / "00000.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for i in range(n):
            rng = _rng(seed, "cc3m", i)
            key = f"{i:09d}"
            url = f"https://synthetic.invalid/cc3m/{seed}/{i}.jpg"
            if i % 10 == 2:
                rows.append({"url": url, "caption": "a picture that never downloaded", "key": key,
                             "status": "failed_to_download", "error_message": "HTTP Error 404: Not Found",
                             "width": None, "height": None, "original_width": None, "original_height": None,
                             "exif": None, "sha256": None})
                continue
            w0, h0 = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
            scene = sample_scene(rng, size=(w0 * 3 // 2, h0 * 3 // 2))
            original = _jpeg(render(scene, rng))
            caption = prefixes[int(rng.integers(len(prefixes)))] + captions(scene, rng)[0].strip().lower().rstrip(".")
            resized = _jpeg(_border_resize(Image.open(io.BytesIO(original))))
            meta = {"url": url, "caption": caption, "key": key, "status": "success", "error_message": None,
                    "width": 256, "height": 256, "original_width": scene.width, "original_height": scene.height,
                    "exif": "{}", "sha256": hashlib.sha256(original).hexdigest()}
            rows.append(meta)
            _tar_add(tar, f"{key}.jpg", resized)
            _tar_add(tar, f"{key}.txt", caption.encode("utf-8"))
            _tar_add(tar, f"{key}.json", json.dumps(meta, indent=4).encode("utf-8"))
    schema = pa.schema([("url", pa.string()), ("caption", pa.string()), ("key", pa.string()),
                        ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int64()),
                        ("height", pa.int64()), ("original_width", pa.int64()), ("original_height", pa.int64()),
                        ("exif", pa.string()), ("sha256", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / "00000.parquet")
    ok = sum(r["status"] == "success" for r in rows)
    failed = len(rows) - ok
    _write_json(root / "00000_stats.json", {
        "count": len(rows), "successes": ok, "failed_to_download": failed, "failed_to_resize": 0,
        "duration": 12.5, "start_time": 1_600_000_000.0, "end_time": 1_600_000_012.5,
        "status_dict": {"success": ok, "HTTP Error 404: Not Found": failed}}, indent=4)
    summary["cc3m"] = {"inputs": len(rows), "successes": ok, "failed_to_download": failed}


def _write_objects365(root: Path, seed: int, n: int, summary: dict) -> None:
    """Objects365 v2 style: `file_name` says images/v2/patchN/... but the files sit in patchN/ (the real
    mismatch), Title-case names with trailing spaces, isfake/isreflected keys, a zero-area box, and one
    listed image missing from disk (as in the real v2 archives)."""
    cats, name_to_id = [], {}
    for cid, (shape, color) in enumerate(((s, c) for s in SHAPES for c in COLORS), start=1):
        name = f"{color} {shape}".title() + (" " if cid % 4 == 0 else "")
        cats.append({"name": name, "id": cid})
        name_to_id[f"{color} {shape}"] = cid
    images, anns = [], []
    ann_id, missing = 1, 0
    for i in range(n):
        rng = _rng(seed, "objects365", i)
        scene = sample_scene(rng)
        image_id = 420_000 + i
        patch = 0 if i < n // 2 else 1
        base = f"objects365_v2_{image_id:08d}.jpg"
        images.append({"height": scene.height, "id": image_id, "license": 5, "width": scene.width,
                       "file_name": f"images/v2/patch{patch}/{base}",
                       "url": f"https://synthetic.invalid/objects365/{base}"})
        if i == n - 1:
            missing += 1  # listed but absent from the archive
        else:
            _write(root / f"patch{patch}" / base, _jpeg(render(scene, rng)))
        for o in scene.objects:
            x, y, w, h = o.bbox
            anns.append({"id": ann_id, "iscrowd": 0, "isfake": 0, "isreflected": 0, "bbox": [x, y, w, h],
                         "area": round(w * h, 2), "image_id": image_id, "category_id": name_to_id[o.label]})
            ann_id += 1
        if i == 0:
            x, y, _, h = scene.objects[0].bbox
            anns.append({"id": ann_id, "iscrowd": 0, "isfake": 0, "isreflected": 0, "bbox": [x, y, 0.0, h],
                         "area": 0.0, "image_id": image_id, "category_id": 1})
            ann_id += 1
    _write_json(root / "zhiyuan_objv2_train.json",
                {"images": images, "annotations": anns, "categories": cats, "licenses": LICENSES})
    summary["objects365"] = {"images": n, "missing_images": missing, "boxes": len(anns), "zero_area_boxes": 1,
                             "categories": len(cats)}
