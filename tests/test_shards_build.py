"""shards.build: box/mask scaling, determinism across workers, round trips with webdataset and tarfile."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from shards.build import Item, build_shards, segmentation_to_rle
from shards.inspect import check_dir
from shards.schema import make_key, validate_record
from tests.shards_testutil import write_jpeg

POLY = [[100.0, 100.0, 700.0, 120.0, 650.0, 500.0, 120.0, 560.0], [10.0, 10.0, 60.0, 10.0, 60.0, 40.0]]


def _items(tmp_path, n=5, size=(800, 600)):
    items = []
    for i in range(n):
        p = write_jpeg(tmp_path / "raw" / f"{i}.jpg", *size, seed=i)
        rec = {"source": "t", "image_id": i, "captions": [f"image {i}"],
               "regions": [{"bbox": [100, 50, 200, 100], "text": "a box", "kind": "region"}],
               "refs": [{"ref_id": i, "ann_id": 10 + i, "category_id": 1, "split": "val", "bbox": [100, 100, 600, 460],
                         "sentences": ["the big shape"], "segmentation": POLY}]}
        items.append(Item(make_key("t", i), str(p), rec))
    return items


def _tar_bytes(d):
    return {p.name: p.read_bytes() for p in sorted(d.glob("shard-*.tar"))}


def test_make_key_is_tar_safe():
    assert make_key("refcoco+", 12) == "refcoco+-12"
    assert make_key("cc3m", "a/b.c..d") == "cc3m-a_b_c__d"


def test_boxes_masks_scaled_to_stored_size(tmp_path):
    m = build_shards(_items(tmp_path, 2), tmp_path / "out", source="t", args={}, max_side=400, samples_per_shard=10)
    assert m["samples"] == 2 and m["refs"] == 2 and m["refs_by_split"] == {"val": 2}
    with tarfile.open(tmp_path / "out" / m["shards"][0]["name"]) as tf:
        names = tf.getnames()
        rec = json.loads(tf.extractfile("t-0.json").read())
        im = Image.open(io.BytesIO(tf.extractfile("t-0.jpg").read()))
    assert names == ["t-0.jpg", "t-0.json", "t-1.jpg", "t-1.json"]
    assert validate_record(rec) == []
    assert im.size == (400, 300) and (rec["width"], rec["height"]) == (400, 300)
    assert (rec["orig_width"], rec["orig_height"]) == (800, 600)
    assert rec["regions"][0]["bbox"] == [50.0, 25.0, 100.0, 50.0]
    assert rec["refs"][0]["bbox"] == [50.0, 50.0, 300.0, 230.0]
    # mask area at the stored size ~ area at the annotation size * scale^2 (pycocotools on the source)
    src = mask_utils.merge(mask_utils.frPyObjects(POLY, 600, 800))
    stored = {"size": rec["refs"][0]["mask"]["size"], "counts": rec["refs"][0]["mask"]["counts"].encode()}
    assert stored["size"] == [300, 400]
    assert mask_utils.area(stored) == pytest.approx(mask_utils.area(src) / 4, rel=0.02)


@pytest.mark.parametrize("kind", ["uncompressed", "compressed", "list_of_rles"])
def test_rle_segmentations_resized_nearest(kind):
    m = np.zeros((60, 80), np.uint8)
    m[10:40, 20:60] = 1
    comp = mask_utils.encode(np.asfortranarray(m))
    if kind == "uncompressed":  # column-major runs, zeros first, as COCO crowd annotations
        flat = m.flatten(order="F")
        runs, cur, n = [], 0, 0
        for v in flat:
            if v != cur:
                runs.append(n)
                cur, n = v, 0
            n += 1
        runs.append(n)
        seg = {"size": [60, 80], "counts": runs}
    elif kind == "compressed":
        seg = {"size": [60, 80], "counts": comp["counts"].decode()}
    else:  # RefCLEF: several RLE dicts, merged
        a, b = m.copy(), m.copy()
        a[:, 40:] = 0
        b[:, :40] = 0
        seg = [{"size": [60, 80], "counts": mask_utils.encode(np.asfortranarray(x))["counts"].decode()} for x in (a, b)]
    rle = segmentation_to_rle(seg, 0.5, 0.5, 40, 30)
    assert rle["size"] == [30, 40]
    dec = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    assert dec.sum() == 15 * 20 and dec[5:20, 10:30].all()
    same = segmentation_to_rle(seg, 1.0, 1.0, 80, 60)
    assert same["counts"] == comp["counts"].decode()


@pytest.mark.slow  # imports webdataset (and so torch) and starts worker processes
def test_workers_give_identical_bytes_and_round_trip(tmp_path):
    items = _items(tmp_path, 7, size=(320, 240))
    m1 = build_shards(items, tmp_path / "w1", source="t", args={}, workers=1, samples_per_shard=2)
    m2 = build_shards(items, tmp_path / "w2", source="t", args={}, workers=2, samples_per_shard=2)
    assert m1 == m2 and len(m1["shards"]) == 4
    assert _tar_bytes(tmp_path / "w1") == _tar_bytes(tmp_path / "w2")
    assert check_dir(tmp_path / "w1") == []

    import webdataset as wds
    urls = [str(tmp_path / "w1" / s["name"]) for s in m1["shards"]]
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node).decode("pil")
    samples = list(ds)
    assert [s["__key__"] for s in samples] == [f"t-{i}" for i in range(7)]
    assert all(s["jpg"].size == (320, 240) and s["json"]["captions"] == [f"image {i}"] for i, s in enumerate(samples))


def test_rerun_reuses_finished_shards_and_rebuilds_changed(tmp_path):
    items = _items(tmp_path, 4, size=(160, 120))
    out = tmp_path / "out"
    m = build_shards(items, out, source="t", args={}, samples_per_shard=2)
    first = (out / "shard-000000.tar").stat().st_mtime_ns
    (out / "shard-000001.tar").unlink()                       # as if killed before this shard finished
    (out / "shard-000001.tar.tmp-999").write_bytes(b"partial")
    assert build_shards(items, out, source="t", args={}, samples_per_shard=2) == m
    assert (out / "shard-000000.tar").stat().st_mtime_ns == first
    assert not list(out.glob("*.tmp-*"))
    items[0].record["captions"] = ["changed"]                  # other input: that shard is rebuilt
    m3 = build_shards(items, out, source="t", args={}, samples_per_shard=2)
    assert m3["shards"][0]["sha256"] != m["shards"][0]["sha256"] and m3["shards"][1] == m["shards"][1]
    assert build_shards(items[:2], out, source="t", args={}, samples_per_shard=2)["samples"] == 2
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar"]


def test_duplicate_keys_rejected(tmp_path):
    items = _items(tmp_path, 1)
    with pytest.raises(ValueError, match="duplicate"):
        build_shards(items + items, tmp_path / "out", source="t", args={})
