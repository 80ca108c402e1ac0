"""The refer reader, the leakage exclusion set and the refcoco converter, on the REAL RefCOCOg excerpt
(../shared/fixtures/real/refcocog: 5 train, 5 val, 5 test refs) and on hand-made RefCLEF RLE cases."""
from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import struct
import tarfile
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from shards.build import build_shards
from shards.inputs import InputError
from shards.refer import (ReferFormatError, excluded_image_ids, load_instances, load_refs, refcoco_items,
                          save_exclusion)


def _py2_pickle(obj, protocol: int = 2) -> bytes:
    """Serialise like Python 2's cPickle: every str becomes a Python-2 *byte* string of its UTF-8 bytes
    (binary SHORT_BINSTRING/BINSTRING at protocol 2, quoted STRING lines at protocol 0), which Python 3
    can only read with an encoding."""
    out = bytearray(b"\x80\x02" if protocol == 2 else b"")

    def dump(o):
        if protocol == 0:
            if isinstance(o, bool) or o is None:
                out.extend({True: b"I01\n", False: b"I00\n", None: b"N"}[o])
            elif isinstance(o, int):
                out.extend(b"I%d\n" % o if -2**31 <= o < 2**31 else b"L%dL\n" % o)
            elif isinstance(o, float):
                out.extend(b"F" + repr(o).encode() + b"\n")
            elif isinstance(o, str):
                body = "".join(chr(c) if 32 <= c < 127 and chr(c) not in "'\\" else f"\\x{c:02x}"
                               for c in o.encode("utf-8"))
                out.extend(b"S'" + body.encode("ascii") + b"'\n")
            elif isinstance(o, list):
                out.extend(b"(l")
                for v in o:
                    dump(v)
                    out.extend(b"a")
            elif isinstance(o, dict):
                out.extend(b"(d")
                for k, v in o.items():
                    dump(k)
                    dump(v)
                    out.extend(b"s")
            else:
                raise TypeError(type(o))
            return
        if isinstance(o, bool):
            out.extend(b"\x88" if o else b"\x89")
        elif o is None:
            out.extend(b"N")
        elif isinstance(o, int):
            if -2**31 <= o < 2**31:
                out.extend(b"J" + struct.pack("<i", o))
            else:
                raw = o.to_bytes((o.bit_length() + 8) // 8, "little", signed=True)
                out.extend(b"\x8a" + bytes([len(raw)]) + raw)
        elif isinstance(o, float):
            out.extend(b"G" + struct.pack(">d", o))
        elif isinstance(o, str):
            b = o.encode("utf-8")
            out.extend((b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b)
        elif isinstance(o, list):
            out.extend(b"](")
            for v in o:
                dump(v)
            out.extend(b"e")
        elif isinstance(o, dict):
            out.extend(b"}(")
            for k, v in o.items():
                dump(k)
                dump(v)
            out.extend(b"u")
        else:
            raise TypeError(type(o))

    dump(obj)
    out.extend(b".")
    return bytes(out)


@pytest.fixture
def refcocog(real_fixtures) -> Path:
    return real_fixtures / "refcocog"


@pytest.fixture
def refer_root(refcocog, tmp_path) -> tuple[Path, Path]:
    """A refer root holding the real refcocog files, and placeholder JPEGs at the sizes instances.json gives."""
    root = tmp_path / "refer"
    shutil.copytree(refcocog, root / "refcocog")
    images = root / "images" / "train2014"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for im in json.loads((refcocog / "instances.json").read_text())["images"]:
        pixels = rng.integers(0, 255, (im["height"], im["width"], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"COCO_train2014_{im['id']:012d}.jpg", quality=70)
    return root, images


def _raw_refs(refcocog: Path) -> list[dict]:
    with open(refcocog / "refs(umd).p", "rb") as f:
        return pickle.load(f)


def test_load_refs_real_fixture_and_both_protocols(refcocog, tmp_path):
    refs = load_refs(refcocog / "refs(umd).p")  # a protocol-4 pickle
    assert refs == _raw_refs(refcocog)
    assert Counter(r["split"] for r in refs) == {"train": 5, "val": 5, "test": 5}
    for protocol in (0, 1, 2, 5):
        p = tmp_path / f"refs(p{protocol}).p"
        p.write_bytes(pickle.dumps(refs, protocol=protocol))
        assert load_refs(p) == refs
    # Python-2 byte strings, one of them non-ASCII UTF-8: the latin1 fallback, then an exact repair
    py2 = [dict(r) for r in refs]
    py2[0] = {**py2[0], "sentences": [{**py2[0]["sentences"][0], "raw": "a woman in a café"}]}
    for protocol in (0, 2):
        p = tmp_path / f"refs(py2-{protocol}).p"
        p.write_bytes(_py2_pickle(py2, protocol))
        with pytest.raises(UnicodeDecodeError):
            pickle.loads(p.read_bytes())
        assert pickle.loads(p.read_bytes(), encoding="bytes")[0][b"ref_id"] == refs[0]["ref_id"]  # really bytes
        assert load_refs(p) == py2


def test_load_refs_rejects_bad_files(tmp_path):
    cases = {
        "missing.p": None,
        "garbage.p": b"this is not a pickle",
        "truncated.p": pickle.dumps([{"ref_id": 1}], protocol=2)[:-5],
        "dict.p": pickle.dumps({"ref_id": 1}, protocol=2),
        "nokeys.p": pickle.dumps([{"ref_id": 1, "split": "train"}], protocol=2),
        "global.p": pickle.dumps([OrderedDict(ref_id=1)], protocol=2),  # never import/call globals
    }
    for name, data in cases.items():
        p = tmp_path / name
        if data is not None:
            p.write_bytes(data)
        with pytest.raises(ReferFormatError) as e:
            load_refs(p)
        msg = str(e.value)
        assert msg.startswith(str(p)) and "\n" not in msg, msg
        assert isinstance(e.value, InputError) and isinstance(e.value, ValueError)
    bad = tmp_path / "instances.json"
    bad.write_text('{"images": [], "annotations": [{"id": 1}]}')
    with pytest.raises(ReferFormatError, match="annotations\\[0\\]"):
        load_instances(bad)
    bad.write_text("{not json")
    with pytest.raises(ReferFormatError, match="malformed JSON"):
        load_instances(bad)


def test_exclusion_set_is_val_and_test_images(refcocog, tmp_path):
    root = tmp_path / "refer"
    shutil.copytree(refcocog, root / "refcocog")
    ids, prov = excluded_image_ids(root)
    refs = _raw_refs(refcocog)
    expected = {r["image_id"] for r in refs if r["split"] in ("val", "test")}
    assert len(expected) == 10 and ids == expected
    assert not ids & {r["image_id"] for r in refs if r["split"] == "train"}
    sha = hashlib.sha256((refcocog / "refs(umd).p").read_bytes()).hexdigest()
    assert prov["files"] == [{"file": "refcocog/refs(umd).p", "sha256": sha, "refs": 15, "non_train_refs": 10,
                              "images": 10}]
    assert prov["missing"] == ["refcoco/refs(unc).p", "refcoco+/refs(unc).p"]
    save_exclusion(tmp_path / "excluded.json", ids, prov)
    saved = json.loads((tmp_path / "excluded.json").read_text())
    assert saved == {"image_ids": sorted(expected), "provenance": prov}
    # The google splits are opt-in; absent files are recorded, not fatal.
    ids_g, prov_g = excluded_image_ids(root, google=True)
    assert ids_g == ids and "refcocog/refs(google).p" in prov_g["missing"]
    # refcoco+ (unc) found too: its non-train images join the set
    (root / "refcoco+").mkdir()
    extra = [{**refs[0], "ref_id": 1, "image_id": 999, "split": "testB"},
             {**refs[0], "ref_id": 2, "image_id": 998, "split": "train"}]
    (root / "refcoco+" / "refs(unc).p").write_bytes(_py2_pickle(extra))
    assert excluded_image_ids(root)[0] == expected | {999}
    with pytest.raises(ReferFormatError, match="holds none of"):
        excluded_image_ids(tmp_path)
    with pytest.raises(ReferFormatError, match="no such directory"):
        excluded_image_ids(tmp_path / "nope")


def test_refcoco_items_on_real_refcocog(refer_root, refcocog):
    root, images = refer_root
    by_split, skips, counts = refcoco_items(root, "refcocog", "umd", images)
    refs = _raw_refs(refcocog)
    inst = json.loads((refcocog / "instances.json").read_text())
    anns = {a["id"]: a for a in inst["annotations"]}
    sizes = {im["id"]: (im["width"], im["height"]) for im in inst["images"]}
    assert skips == {}
    assert sorted(by_split) == ["test", "train", "val"]
    for split, items in by_split.items():
        mine = [r for r in refs if r["split"] == split]
        assert len(items) == 5 and sum(len(it.record["refs"]) for it in items) == 5
        assert counts[split] == {"images_in_file": 5, "refs_in_file": 5,
                                 "sentences_in_file": sum(len(r["sentences"]) for r in mine)}
        ids = [int(it.record["image_id"]) for it in items]
        assert ids == sorted(ids)
        for it in items:
            image_id = int(it.record["image_id"])
            assert it.key == f"refcocog-{image_id}" and it.ann_size == sizes[image_id]
            assert it.image == str(images / f"COCO_train2014_{image_id:012d}.jpg")  # from the id, not file_name
            for ref in it.record["refs"]:
                src = next(r for r in mine if r["ref_id"] == ref["ref_id"])
                ann = anns[src["ann_id"]]
                assert ref["split"] == split and ref["ann_id"] == src["ann_id"]
                assert ref["bbox"] == ann["bbox"] and ref["segmentation"] == ann["segmentation"]
                assert ref["sentences"] == [s["sent"] for s in src["sentences"]]


def test_refcoco_items_counts_what_it_skips(refer_root, refcocog):
    root, images = refer_root
    refs = _raw_refs(refcocog)
    val = [r for r in refs if r["split"] == "val"]
    bad = [{**r, "ann_id": -1} if r["ref_id"] == val[0]["ref_id"] else r for r in refs]
    (root / "refcocog" / "refs(umd).p").write_bytes(pickle.dumps(bad, protocol=2))
    (images / f"COCO_train2014_{val[1]['image_id']:012d}.jpg").unlink()
    test_images = {r["image_id"] for r in refs if r["split"] == "test"}
    by_split, skips, _ = refcoco_items(root, "refcocog", "umd", images, exclude_ids=test_images | {refs[0]["image_id"]})
    assert skips == {"val": {"ref_ann_missing": 1, "ref_image_missing": 1},
                     "train": {"ref_image_in_eval_split": 1}}
    assert [len(by_split[s]) for s in ("train", "val", "test")] == [4, 3, 5]
    with pytest.raises(ReferFormatError, match="no 'unc' split"):
        refcoco_items(root, "refcocog", "unc", images)
    with pytest.raises(ReferFormatError, match="no such file"):
        refcoco_items(root, "refcoco", "unc", images)
    with pytest.raises(ReferFormatError, match="no such directory"):
        refcoco_items(root / "nope", "refcocog", "umd", images)
    with pytest.raises(ReferFormatError, match="no such directory"):
        refcoco_items(root, "refcocog", "umd", images / "nope")


def _read_shards(split_dir: Path) -> list[dict]:
    recs = []
    for tar in sorted(split_dir.glob("shard-*.tar")):
        with tarfile.open(tar) as tf:
            recs += [json.loads(tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(".json")]
    return recs


@pytest.mark.parametrize("max_side", [None, 320])
def test_refcoco_converter_end_to_end(refer_root, refcocog, tmp_path, max_side):
    root, images = refer_root
    by_split, skips, counts = refcoco_items(root, "refcocog", "umd", images)
    coco = COCO(str(refcocog / "instances.json"))
    refs = {r["ref_id"]: r for r in _raw_refs(refcocog)}
    for split, items in by_split.items():
        m = build_shards(items, tmp_path / "out" / split, source="refcocog", args={"split": split},
                         samples_per_shard=2, max_side=max_side, extra_skips=skips.get(split),
                         extra_counts=counts[split])
        assert m["samples"] == 5 and m["refs"] == 5
        assert m["sentences"] == counts[split]["sentences_in_file"]
        assert (tmp_path / "out" / split / "manifest.json").is_file()
        recs = _read_shards(tmp_path / "out" / split)
        assert len(recs) == 5 and sum(len(r["refs"]) for r in recs) == 5
        for rec in recs:
            img = coco.imgs[int(rec["image_id"])]
            sx, sy = rec["width"] / img["width"], rec["height"] / img["height"]
            assert (rec["orig_width"], rec["orig_height"]) == (img["width"], img["height"])
            for ref in rec["refs"]:
                ann = coco.anns[refs[ref["ref_id"]]["ann_id"]]
                assert ref["split"] == split
                x, y, bw, bh = ann["bbox"]
                assert ref["bbox"] == pytest.approx([x * sx, y * sy, bw * sx, bh * sy], abs=0.02)
                area = float(mask_utils.area(ref["mask"]))
                assert ref["mask"]["size"] == [rec["height"], rec["width"]]
                source_area = float(coco.annToMask(ann).sum())
                if max_side is None:
                    assert area == source_area
                else:  # polygons are rasterised at the stored size: area scales by sx*sy (edge pixels aside)
                    assert area == pytest.approx(source_area * sx * sy, rel=0.06, abs=40)


def test_refclef_rle_segmentations(tmp_path):
    """RefCLEF: RLE masks as a dict or a list of dicts with str or list counts; SAIAPR image folders."""
    h, w = 60, 80
    parts = [np.zeros((h, w), np.uint8) for _ in range(3)]
    parts[0][5:20, 5:30] = 1
    parts[1][30:50, 40:70] = 1
    parts[2][10:25, 50:75] = 1
    def rle_str(m):
        r = mask_utils.encode(np.asfortranarray(m))
        return {"size": r["size"], "counts": r["counts"].decode()}
    def rle_list(m):
        flat = m.reshape(-1, order="F")
        edges = np.flatnonzero(np.diff(flat)) + 1
        counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
        return {"size": [h, w], "counts": ([0] + counts) if flat[0] else counts}
    segs = {1: rle_str(parts[0]), 2: [rle_str(parts[1]), rle_str(parts[2])], 3: rle_list(parts[1]),
            4: [rle_list(parts[0]), rle_list(parts[2])]}
    expected = {1: parts[0], 2: parts[1] | parts[2], 3: parts[1], 4: parts[0] | parts[2]}
    root = tmp_path / "refer"
    (root / "refclef").mkdir(parents=True)
    images = tmp_path / "images"
    image_ids = {1: 17001, 2: 17001, 3: 25, 4: 25}
    inst = {"images": [{"id": i, "width": w, "height": h, "file_name": f"{i}.jpg"} for i in (17001, 25)],
            "annotations": [{"id": a, "image_id": image_ids[a], "bbox": list(mask_utils.toBbox(mask_utils.encode(
                np.asfortranarray(expected[a])))), "segmentation": segs[a], "category_id": 3} for a in segs],
            "categories": [{"id": 3, "name": "thing"}]}
    for a in inst["annotations"]:
        a["bbox"] = [float(v) for v in a["bbox"]]
    (root / "refclef" / "instances.json").write_text(json.dumps(inst))
    refs = [{"ref_id": a, "ann_id": a, "image_id": image_ids[a], "split": "train" if a < 3 else "test",
             "category_id": 3, "sentences": [{"sent": f"thing {a}", "raw": f"Thing {a}", "tokens": [], "sent_id": a}]}
            for a in segs]
    (root / "refclef" / "refs(berkeley).p").write_bytes(_py2_pickle(refs))
    (images / "saiapr_tc-12" / "17" / "images").mkdir(parents=True)
    Image.new("RGB", (w, h), (9, 9, 9)).save(images / "saiapr_tc-12" / "17" / "images" / "17001.jpg")
    Image.new("RGB", (w, h), (9, 9, 9)).save(images / "25.jpg")  # the flat ReferItGame layout
    by_split, skips, _ = refcoco_items(root, "refclef", "berkeley", images)
    assert skips == {} and {s: len(v) for s, v in by_split.items()} == {"train": 1, "test": 1}
    for split, items in by_split.items():
        build_shards(items, tmp_path / "out" / split, source="refclef", args={}, max_side=None)
        for rec in _read_shards(tmp_path / "out" / split):
            for ref in rec["refs"]:
                got = mask_utils.decode(ref["mask"])
                assert np.array_equal(got, expected[ref["ann_id"]]), ref["ann_id"]
