"""Every converter on the synthetic raw data (shards.synthetic) and on small quirky raw inputs."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from shards.__main__ import main
from shards.inspect import check_dir, iter_tar_samples
from shards.manifest import read_manifest
from shards.refer import excluded_image_ids
from tests.shards_testutil import photo, tiny_coco, write_jpeg, write_json


def _records(d: Path) -> dict[str, dict]:
    m = read_manifest(d)
    out = {}
    for s in m["shards"]:
        for key, group in iter_tar_samples(d / s["name"]):
            out[key] = json.loads(group["json"])
    return out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from shards.synthetic import generate
    raw = tmp_path_factory.mktemp("synthetic")
    summary = generate(raw, seed=0, images=16)
    return raw, summary


def test_coco_and_vg_on_synthetic_with_exclusion(synthetic, tmp_path):
    raw, summary = synthetic
    refer = raw / "refer"
    excluded, _ = excluded_image_ids(refer)
    assert len(excluded) == summary["refcoco"]["non_train_images"] > 0
    cap, inst = raw / "coco/annotations/captions_train2017.json", raw / "coco/annotations/instances_train2017.json"
    assert main(["coco", "--images", str(raw / "coco/train2017"), "--captions", str(cap), "--instances", str(inst),
                 "--exclude-refer", str(refer), "--out", str(tmp_path / "coco"), "--samples-per-shard", "4",
                 "--workers", "2"]) == 0
    m = read_manifest(tmp_path / "coco")
    assert check_dir(tmp_path / "coco") == []
    coco_caps, coco_inst = COCO(str(cap)), COCO(str(inst))
    kept = sorted(set(coco_caps.getImgIds()) - excluded)
    assert m["samples"] == len(kept) and m["skipped"]["excluded_refer"] == len(excluded)
    assert m["extra"]["exclude_refer"]["images"] == len(excluded)
    recs = _records(tmp_path / "coco")
    assert {int(r["image_id"]) for r in recs.values()} == set(kept)
    for iid in kept:
        r = recs[f"coco-{iid}"]
        assert len(r["captions"]) == len(coco_caps.getAnnIds(imgIds=iid))
        anns = coco_inst.loadAnns(coco_inst.getAnnIds(imgIds=iid, iscrowd=False))
        got = [v for g in r.get("regions", []) for v in g["bbox"]]
        assert got == pytest.approx([v for a in anns for v in a["bbox"]], abs=0.01)
        assert [g["text"] for g in r.get("regions", [])] == [coco_inst.cats[a["category_id"]]["name"] for a in anns]
    assert m["skipped"]["object_crowd"] == len(coco_inst.getAnnIds(iscrowd=True))

    vg = raw / "vg"
    assert main(["vg", "--images", str(vg), "--image-data", str(vg / "image_data.json"), "--regions",
                 str(vg / "region_descriptions.json"), "--objects", str(vg / "objects.json"),
                 "--exclude-refer", str(refer), "--out", str(tmp_path / "vg")]) == 0
    m = read_manifest(tmp_path / "vg")
    assert check_dir(tmp_path / "vg") == []
    image_data = json.loads((vg / "image_data.json").read_text())
    dropped = [e for e in image_data if e.get("coco_id") in excluded]
    assert dropped and m["skipped"]["excluded_refer"] == len(dropped)
    assert m["skipped"]["orphan_image_entry"] == summary["vg"]["orphan_region_images"]
    recs = _records(tmp_path / "vg")
    assert not {e["image_id"] for e in dropped} & {int(r["image_id"]) for r in recs.values()}
    objects = {e["image_id"]: e["objects"] for e in json.loads((vg / "objects.json").read_text())}
    some = next(r for r in recs.values() if objects.get(int(r["image_id"])))
    first = objects[int(some["image_id"])][0]
    texts = [g["text"] for g in some["regions"] if g["kind"] == "object"]
    assert texts[0].endswith(first["names"][0]) and (not first.get("attributes") or
                                                     texts[0] == f"{first['attributes'][0]} {first['names'][0]}")


def test_img2dataset_objects365_refcoco_on_synthetic(synthetic, tmp_path):
    raw, summary = synthetic
    assert main(["img2dataset", "--input", str(raw / "cc3m"), "--source", "cc3m", "--out", str(tmp_path / "cc3m")]) == 0
    m = read_manifest(tmp_path / "cc3m")
    assert m["samples"] == m["captions"] == summary["cc3m"]["successes"]
    assert m["extra"]["img2dataset"]["failed_to_download"] == summary["cc3m"]["failed_to_download"]
    assert check_dir(tmp_path / "cc3m") == []

    o365 = raw / "objects365"
    assert main(["objects365", "--images", str(o365), "--annotations", str(o365 / "zhiyuan_objv2_train.json"),
                 "--out", str(tmp_path / "o365")]) == 0
    m = read_manifest(tmp_path / "o365")
    assert m["samples"] == summary["objects365"]["images"] - summary["objects365"]["missing_images"]
    assert m["skipped"]["image_missing"] == summary["objects365"]["missing_images"]
    assert m["skipped"]["box_zero_area"] == summary["objects365"]["zero_area_boxes"]
    assert check_dir(tmp_path / "o365") == []

    refer = raw / "refer"
    for max_side in ("0", "128"):
        out = tmp_path / f"refcoco{max_side}"
        assert main(["refcoco", "--refer-root", str(refer), "--dataset", "refcoco", "--split-by", "unc", "--images",
                     str(refer / "images/train2014"), "--out", str(out), "--max-side", max_side]) == 0
        gt = COCO(str(refer / "refcoco/instances.json"))
        for split in ("train", "val", "testA", "testB"):
            m = read_manifest(out / split)
            assert m["refs"] == summary["refcoco"][split]["refs"] and m["refs_by_split"] == {split: m["refs"]}
            assert m["sentences"] == summary["refcoco"][split]["sentences"]
            assert check_dir(out / split) == []
            for rec in _records(out / split).values():
                s = rec["width"] / rec["orig_width"]
                for ref in rec["refs"]:
                    area = mask_utils.area({"size": ref["mask"]["size"], "counts": ref["mask"]["counts"].encode()})
                    src = gt.annToMask(gt.anns[ref["ann_id"]]).sum()
                    if max_side == "0":
                        assert area == src and ref["bbox"] == pytest.approx(gt.anns[ref["ann_id"]]["bbox"], abs=0.01)
                    else:
                        assert area == pytest.approx(src * s * s, rel=0.12, abs=8)


def test_coco_quirks_2014_names_crowd_orphans(tmp_path):
    images, captions, instances = tiny_coco(tmp_path, n=3)
    cap = json.loads(captions.read_text())
    for im in cap["images"]:  # a 2014 captions file against a train2017 image folder
        im["file_name"] = f"COCO_train2014_{im['id']:012d}.jpg"
    cap["annotations"].append({"id": 9, "image_id": 999, "caption": "orphan"})
    captions.write_text(json.dumps(cap))
    inst = json.loads(instances.read_text())
    inst["annotations"] += [
        {"id": 7, "image_id": 1, "category_id": 3, "bbox": [0, 0, 30, 30], "iscrowd": 1,
         "segmentation": {"size": [240, 320], "counts": [0, 100]}},
        {"id": 8, "image_id": 2, "category_id": 77, "bbox": [0, 0, 30, 30], "iscrowd": 0},
        {"id": 900300255917, "image_id": 3, "category_id": 3, "bbox": [300, 200, 60, 60], "iscrowd": 0}]
    instances.write_text(json.dumps(inst))
    assert main(["coco", "--images", str(images), "--captions", str(captions), "--instances", str(instances),
                 "--out", str(tmp_path / "out")]) == 0
    m = read_manifest(tmp_path / "out")
    assert m["samples"] == 3 and m["captions"] == 6 and m["regions"] == 4
    assert m["skipped"] == {"caption_orphan": 1, "object_crowd": 1, "object_unknown_category": 1}
    assert m["repaired"] == {"box_clipped": 1}
    rec = _records(tmp_path / "out")["coco-3"]
    assert rec["captions"] == ["picture 3 number 0", "picture 3 number 1"]
    assert rec["regions"][1] == {"bbox": [300.0, 200.0, 20.0, 40.0], "text": "car", "kind": "object"}


def test_img2dataset_quirks(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    rows = []
    with tarfile.open(d / "00000.tar", "w") as tf:
        def add(name, data):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        for i, (caption, status, fmt) in enumerate([(b"a good caption", "success", "JPEG"),
                                                     (b"caf\xe9 latin-1", "success", "JPEG"),
                                                     (b"png bytes", "success", "PNG"),
                                                     (b"  ", "success", "JPEG"),
                                                     (b"should not be here", "failed_to_resize", "JPEG")]):
            key = f"{i:09d}"
            buf = io.BytesIO()
            photo(64, 48, i).save(buf, fmt)
            add(f"{key}.jpg", buf.getvalue())
            add(f"{key}.txt", caption)
            add(f"{key}.json", json.dumps({"key": key, "status": status, "url": f"http://x/{i}"}, indent=4).encode())
            rows.append({"key": key, "status": status})
    rows.append({"key": "000000005", "status": "failed_to_download"})
    pq.write_table(pa.Table.from_pylist(rows), d / "00000.parquet")
    assert main(["img2dataset", "--input", str(d), "--source", "sbu", "--out", str(tmp_path / "out")]) == 0
    m = read_manifest(tmp_path / "out")
    assert m["samples"] == 2 and m["source"] == "sbu"
    assert m["skipped"] == {"status_failed_to_resize": 1, "text_not_utf8": 1, "text_empty": 1, "no_annotations": 2}
    assert m["repaired"] == {"image_not_jpeg": 1}
    assert m["extra"]["img2dataset"] == {"count": 6, "successes": 4, "failed_to_download": 1, "failed_to_resize": 1}
    assert sorted(_records(tmp_path / "out")) == ["sbu-000000000", "sbu-000000002"]


def test_objects365_path_prefixes_and_category_ids(tmp_path):
    imgs = tmp_path / "o365"
    write_jpeg(imgs / "patch8" / "objects365_v1_00000001.jpg", 100, 80)
    write_jpeg(imgs / "objects365_v2_00000002.jpg", 100, 80)           # flattened layout
    write_jpeg(imgs / "patch16" / "objects365_v2_00000003.jpg", 100, 80)
    ann = {"images": [
        {"id": 1, "file_name": "images/v1/patch8/objects365_v1_00000001.jpg", "width": 100, "height": 80},
        {"id": 2, "file_name": "images/v2/patch3/objects365_v2_00000002.jpg", "width": 100, "height": 80},
        {"id": 3, "file_name": "patch16/objects365_v2_00000003.jpg", "width": 100, "height": 80},
        {"id": 4, "file_name": "images/v2/patch16/objects365_v2_00908726.jpg", "width": 100, "height": 80}],
        "annotations": [{"id": k, "image_id": k, "category_id": 5 if k % 2 else 2, "bbox": [1, 2, 30, 20],
                         "iscrowd": 0, "isfake": 0} for k in (1, 2, 3, 4)]
        + [{"id": 9, "image_id": 1, "category_id": 2, "bbox": [5, 5, 0, 10], "iscrowd": 0, "area": 0}],
        "categories": [{"id": 5, "name": "Formula 1 "}, {"id": 2, "name": "Moniter/TV"}]}
    f = write_json(tmp_path / "ann.json", ann)
    assert main(["objects365", "--images", str(imgs), "--annotations", str(f), "--out", str(tmp_path / "out")]) == 0
    m = read_manifest(tmp_path / "out")
    assert m["samples"] == 3 and m["skipped"] == {"image_missing": 1, "box_zero_area": 1}
    recs = _records(tmp_path / "out")
    assert [g["text"] for g in recs["objects365-1"]["regions"]] == ["Formula 1"]
    assert [g["text"] for g in recs["objects365-2"]["regions"]] == ["Moniter/TV"]


def test_workers_1_and_2_identical_through_the_cli(tmp_path):
    images, captions, instances = tiny_coco(tmp_path, n=6)
    for w in ("1", "2"):
        assert main(["coco", "--images", str(images), "--captions", str(captions), "--instances", str(instances),
                     "--out", str(tmp_path / f"w{w}"), "--workers", w, "--samples-per-shard", "2"]) == 0
    a, b = read_manifest(tmp_path / "w1"), read_manifest(tmp_path / "w2")
    assert a["shards"] == b["shards"] and len(a["shards"]) == 3
    assert {k: v for k, v in a.items() if k != "args"} == {k: v for k, v in b.items() if k != "args"}
