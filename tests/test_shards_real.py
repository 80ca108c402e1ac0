"""Converters on the real annotation excerpts (../shared/fixtures/real), checked against pycocotools' reading.

No images ship with the excerpts: placeholder JPEGs are written at the sizes the JSON gives.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from shards.__main__ import main
from shards.inspect import check_dir, iter_tar_samples
from shards.manifest import read_manifest
from shards.refer import excluded_image_ids
from tests.shards_testutil import write_json


def _placeholder(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (120, 90, 60)).save(path, quality=90)


def _records(d: Path) -> dict[str, dict]:
    return {k: json.loads(g["json"]) for s in read_manifest(d)["shards"] for k, g in iter_tar_samples(d / s["name"])}


def _scaled_clipped(b, rec):
    """The box in stored pixels: scaled per axis by stored/original size, clipped to the image."""
    w, h = rec["width"], rec["height"]
    sx, sy = w / rec["orig_width"], h / rec["orig_height"]
    x1, y1 = min(max(b[0] * sx, 0), w), min(max(b[1] * sy, 0), h)
    x2, y2 = min(max((b[0] + b[2]) * sx, 0), w), min(max((b[1] + b[3]) * sy, 0), h)
    return [x1, y1, x2 - x1, y2 - y1]


def test_coco_real_captions(real_fixtures, tmp_path):
    cap_file = real_fixtures / "coco" / "captions_train.json"
    gt = COCO(str(cap_file))
    for im in gt.imgs.values():
        _placeholder(tmp_path / "img" / im["file_name"], im["width"], im["height"])
    assert main(["coco", "--images", str(tmp_path / "img"), "--captions", str(cap_file), "--out",
                 str(tmp_path / "out"), "--max-side", "320"]) == 0
    assert check_dir(tmp_path / "out") == []
    recs = _records(tmp_path / "out")
    assert len(recs) == len(gt.imgs) == read_manifest(tmp_path / "out")["samples"]
    for iid, im in gt.imgs.items():
        r = recs[f"coco-{iid}"]
        assert (r["orig_width"], r["orig_height"]) == (im["width"], im["height"]) and max(r["width"], r["height"]) == 320
        want = [" ".join(a["caption"].split()) for a in gt.loadAnns(gt.getAnnIds(imgIds=iid))]
        assert r["captions"] == want


def test_coco_real_instances_boxes(real_fixtures, tmp_path):
    inst_file = real_fixtures / "refcocog" / "instances.json"
    gt = COCO(str(inst_file))
    images = list(gt.imgs.values())
    for im in images:
        _placeholder(tmp_path / "img" / im["file_name"], im["width"], im["height"])
    caps = write_json(tmp_path / "captions.json", {"images": images, "annotations": [
        {"id": k, "image_id": im["id"], "caption": "a photo"} for k, im in enumerate(images)]})
    assert main(["coco", "--images", str(tmp_path / "img"), "--captions", str(caps), "--instances", str(inst_file),
                 "--out", str(tmp_path / "out"), "--max-side", "320"]) == 0
    recs = _records(tmp_path / "out")
    n_regions = 0
    for im in images:
        r = recs[f"coco-{im['id']}"]
        anns = gt.loadAnns(gt.getAnnIds(imgIds=im["id"], iscrowd=False))
        want = [_scaled_clipped(a["bbox"], r) for a in anns]
        got = r.get("regions", [])
        assert [g["text"] for g in got] == [gt.cats[a["category_id"]]["name"] for a in anns]
        assert [v for g in got for v in g["bbox"]] == pytest.approx([v for b in want for v in b], abs=0.011)
        n_regions += len(got)
    m = read_manifest(tmp_path / "out")
    assert m["regions"] == n_regions == len(gt.getAnnIds(iscrowd=False))
    assert m["skipped"].get("object_crowd", 0) == len(gt.getAnnIds(iscrowd=True))


def test_vg_real_regions(real_fixtures, tmp_path):
    vg = real_fixtures / "vg"
    image_data = json.loads((vg / "image_data.json").read_text())
    regions = json.loads((vg / "region_descriptions.json").read_text())
    for e in image_data:
        folder = e["url"].split("/")[-2]
        _placeholder(tmp_path / "vg" / folder / f"{e['image_id']}.jpg", e["width"], e["height"])
    assert main(["vg", "--images", str(tmp_path / "vg"), "--image-data", str(vg / "image_data.json"), "--regions",
                 str(vg / "region_descriptions.json"), "--out", str(tmp_path / "out")]) == 0
    m = read_manifest(tmp_path / "out")
    assert check_dir(tmp_path / "out") == []
    meta = {e["image_id"]: e for e in image_data}
    orphans = [e for e in regions if e["id"] not in meta]
    assert len(orphans) == 1 and m["skipped"]["orphan_image_entry"] == 1
    assert m["skipped"]["region_orphan"] == len(orphans[0]["regions"])
    recs = _records(tmp_path / "out")
    total = 0
    for e in regions:
        if e["id"] not in meta:
            continue
        r = recs[f"vg-{e['id']}"]
        want = [(" ".join(g["phrase"].split()), _scaled_clipped([g["x"], g["y"], g["width"], g["height"]], r)) for g in e["regions"]]
        want = [(t, b) for t, b in want if round(b[2], 2) > 0 and round(b[3], 2) > 0 and t]
        assert [g["text"] for g in r["regions"]] == [t for t, _ in want]
        assert [v for g in r["regions"] for v in g["bbox"]] == pytest.approx([v for _, b in want for v in b], abs=0.011)
        total += len(want)
    assert m["regions"] == total


def test_refcocog_real(real_fixtures, tmp_path):
    gt = COCO(str(real_fixtures / "refcocog" / "instances.json"))
    for im in gt.imgs.values():
        _placeholder(tmp_path / "train2014" / f"COCO_train2014_{im['id']:012d}.jpg", im["width"], im["height"])
    assert main(["refcoco", "--refer-root", str(real_fixtures), "--dataset", "refcocog", "--split-by", "umd",
                 "--images", str(tmp_path / "train2014"), "--out", str(tmp_path / "out")]) == 0
    with open(real_fixtures / "refcocog" / "refs(umd).p", "rb") as f:
        refs = {r["ref_id"]: r for r in pickle.load(f)}
    for split in ("train", "val", "test"):
        d = tmp_path / "out" / split
        m = read_manifest(d)
        want = [r for r in refs.values() if r["split"] == split]
        assert m["refs"] == len(want) == 5 and m["sentences"] == sum(len(r["sentences"]) for r in want)
        assert check_dir(d) == []
        for rec in _records(d).values():
            for ref in rec["refs"]:
                ann = gt.anns[ref["ann_id"]]
                assert ref["bbox"] == pytest.approx(ann["bbox"], abs=0.01)
                assert ref["sentences"] == [s["sent"] for s in refs[ref["ref_id"]]["sentences"]]
                area = mask_utils.area({"size": ref["mask"]["size"], "counts": ref["mask"]["counts"].encode()})
                assert area == gt.annToMask(ann).sum()


def test_exclusion_real_refcocog(real_fixtures, tmp_path):
    """Images of the real RefCOCOg val/test refs never reach COCO or VG pretraining shards."""
    excluded, _ = excluded_image_ids(real_fixtures)
    with open(real_fixtures / "refcocog" / "refs(umd).p", "rb") as f:
        assert excluded == {r["image_id"] for r in pickle.load(f) if r["split"] != "train"}
    assert len(excluded) == 10
    gt = COCO(str(real_fixtures / "refcocog" / "instances.json"))
    images = list(gt.imgs.values())
    for im in images:
        _placeholder(tmp_path / "coco" / f"{im['id']:012d}.jpg", im["width"], im["height"])
        _placeholder(tmp_path / "vg" / "VG_100K" / f"{im['id'] + 5_000_000}.jpg", im["width"], im["height"])
    caps = write_json(tmp_path / "captions.json", {"images": [{**im, "file_name": f"{im['id']:012d}.jpg"}
                                                              for im in images],
                                                   "annotations": [{"id": k, "image_id": im["id"], "caption": "x"}
                                                                   for k, im in enumerate(images)]})
    vg_meta = [{"image_id": im["id"] + 5_000_000, "width": im["width"], "height": im["height"], "coco_id": im["id"],
                "url": f"https://x/VG_100K/{im['id'] + 5_000_000}.jpg"} for im in images]
    image_data = write_json(tmp_path / "image_data.json", vg_meta)
    vg_regions = write_json(tmp_path / "regions.json", [{"id": e["image_id"], "regions": [
        {"region_id": 1, "phrase": "a thing", "x": 1, "y": 1, "width": 20, "height": 20}]} for e in vg_meta])
    assert main(["coco", "--images", str(tmp_path / "coco"), "--captions", str(caps), "--exclude-refer",
                 str(real_fixtures), "--out", str(tmp_path / "coco_out")]) == 0
    assert main(["vg", "--images", str(tmp_path / "vg"), "--image-data", str(image_data), "--regions", str(vg_regions),
                 "--exclude-refer", str(real_fixtures), "--out", str(tmp_path / "vg_out")]) == 0
    coco_ids = {int(r["image_id"]) for r in _records(tmp_path / "coco_out").values()}
    vg_coco_ids = {int(r["image_id"]) - 5_000_000 for r in _records(tmp_path / "vg_out").values()}
    assert coco_ids == vg_coco_ids == {im["id"] for im in images} - excluded
    for d in ("coco_out", "vg_out"):
        m = read_manifest(tmp_path / d)
        assert m["skipped"]["excluded_refer"] == 10
        prov = m["extra"]["exclude_refer"]
        assert prov["images"] == 10 and [f["file"] for f in prov["files"]] == ["refcocog/refs(umd).p"]
        assert len(prov["files"][0]["sha256"]) == 64
        assert json.loads((tmp_path / d / prov["ids_file"]).read_text())["image_ids"] == sorted(excluded)
