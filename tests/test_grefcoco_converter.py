"""`python -m shards refcoco --dataset grefcoco`: a small hand-written gRefCOCO fixture (ann_id as an int, a list,
[-1] and -1; an explicit no_target; a duplicate ref_id; bad refs) -> the generalised ref schema, counted skips,
and one-line errors for malformed files."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.__main__ import main
from shards.masks import decode_mask
from shards.refer import refcoco_items
from shards.schema import validate_record


def _poly(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


@pytest.fixture
def groot(tmp_path) -> Path:
    root = tmp_path / "refer"
    (root / "grefcoco").mkdir(parents=True)
    images = root / "images" / "train2014"
    images.mkdir(parents=True)
    ims = [{"id": 11, "width": 80, "height": 60}, {"id": 12, "width": 64, "height": 64}]
    for im in ims:
        Image.fromarray(np.full((im["height"], im["width"], 3), 90, np.uint8)).save(
            images / f"COCO_train2014_{im['id']:012d}.jpg")
    boxes = {101: (11, [5, 5, 20, 10]), 102: (11, [40, 20, 30, 30]), 103: (11, [0, 40, 10, 10]),
             201: (12, [10, 10, 40, 40])}
    anns = [{"id": a, "image_id": i, "bbox": b, "category_id": 1, "segmentation": _poly(*b), "area": b[2] * b[3],
             "iscrowd": 0} for a, (i, b) in boxes.items()]
    (root / "grefcoco" / "instances.json").write_text(json.dumps(
        {"images": ims, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    sent = lambda t: [{"sent": t, "raw": t, "tokens": t.split(), "sent_id": 0}]  # noqa: E731
    refs = [
        {"ref_id": 1, "image_id": 11, "split": "val", "ann_id": [101, 102], "category_id": [1, 1],
         "no_target": False, "sentences": sent("the two things")},
        {"ref_id": 2, "image_id": 11, "split": "val", "ann_id": [-1], "category_id": [-1], "no_target": True,
         "sentences": sent("the purple thing")},
        {"ref_id": 3, "image_id": 12, "split": "val", "ann_id": 201, "category_id": 1,
         "sentences": sent("the thing")},                                     # int ann_id, no no_target key
        {"ref_id": 4, "image_id": 12, "split": "train", "ann_id": -1, "sentences": ["nothing here"]},
        {"ref_id": 4, "image_id": 12, "split": "train", "ann_id": [201], "sentences": ["a duplicate id"]},
        {"ref_id": 5, "image_id": 11, "split": "val", "ann_id": [101, -1], "sentences": ["bad ids"]},
        {"ref_id": 6, "image_id": 11, "split": "val", "ann_id": [101], "no_target": True, "sentences": ["contradiction"]},
        {"ref_id": 7, "image_id": 11, "split": "val", "ann_id": [101, 999], "sentences": ["a missing target"]},
        {"ref_id": 8, "image_id": 11, "split": "val", "ann_id": "101", "sentences": ["a string id"]},
    ]
    (root / "grefcoco" / "grefs(unc).json").write_text(json.dumps(refs))
    return root


def test_grefcoco_items(groot):
    by_split, skips, counts = refcoco_items(groot, "grefcoco", "unc", groot / "images" / "train2014")
    val = {r["ref_id"]: r for it in by_split["val"] for r in it.record["refs"]}
    assert sorted(val) == [1, 2, 3]
    assert val[1]["ann_ids"] == [101, 102] and val[1]["bboxes"] == [[5, 5, 20, 10], [40, 20, 30, 30]]
    assert val[2]["ann_ids"] == [] and val[2]["no_target"] and val[2]["bboxes"] == []
    assert val[3]["ann_ids"] == [201] and not val[3]["no_target"]
    train = [r for it in by_split["train"] for r in it.record["refs"]]
    assert [(r["ref_id"], r["no_target"]) for r in train] == [(4, True)]   # the first of the duplicate ids kept
    assert skips["val"] == {"ref_ann_missing": 1}
    assert counts["val"]["refused_ref_bad_ann_id"] == 3 and counts["val"]["refused_ref_duplicate_id"] == 1
    assert counts["val"]["multi_target_refs_in_file"] == 1 and counts["val"]["no_target_refs_in_file"] == 1


def _records(d: Path) -> list[dict]:
    recs = []
    for tar in sorted(d.glob("shard-*.tar")):
        with tarfile.open(tar) as tf:
            recs += [json.load(tf.extractfile(m)) for m in tf if m.name.endswith(".json")]
    return recs


def test_converter_writes_the_generalised_schema(groot, tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["refcoco", "--refer-root", str(groot), "--dataset", "grefcoco", "--split-by", "unc", "--images",
                 str(groot / "images" / "train2014"), "--out", str(out)]) == 0
    recs = _records(out / "val")
    assert all(validate_record(r) == [] for r in recs)
    refs = {r["ref_id"]: (rec, r) for rec in recs for r in rec["refs"]}
    rec, two = refs[1]
    assert len(two["masks"]) == 2 and "bbox" not in two and "mask" not in two
    m = decode_mask(two["masks"][1])
    assert m.shape == (60, 80) and m[20:50, 40:70].all() and m.sum() == 900   # the second target's own mask
    assert refs[2][1] == {**refs[2][1], "ann_ids": [], "no_target": True, "bboxes": []}
    assert json.loads((out / "val" / "manifest.json").read_text())["refs"] == 3
    assert validate_record({**rec, "refs": [{**two, "no_target": True}]})            # contradiction is invalid
    assert validate_record({**rec, "refs": [{**two, "bboxes": two["bboxes"][:1]}]})  # one box per ann id


@pytest.mark.parametrize("content, needle", [("{not json", "malformed JSON"), ('{"refs": []}', "expected a JSON list"),
                                             ('[{"ref_id": 1}]', "ref 0 lacks key(s)")])
def test_malformed_grefs_file_is_one_line(groot, tmp_path, capsys, content, needle):
    (groot / "grefcoco" / "grefs(unc).json").write_text(content)
    rc = main(["refcoco", "--refer-root", str(groot), "--dataset", "grefcoco", "--split-by", "unc", "--images",
               str(groot / "images" / "train2014"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "grefs(unc).json" in err and needle in err, err
