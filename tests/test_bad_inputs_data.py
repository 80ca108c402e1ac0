"""The bad-input corpus, part 1: converters, the shard writer, inspect and the loaders (see tests/badcorpus.py)."""
from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import pytest

from badcorpus import (CASES, bomb_png, caption_anns, case, coco_with, good_images, jpeg_bytes, lying_jpeg, manifest,
                       one_line_error, run_case, run_shards, shards_with_bad_image, tree)
from loader_shards import data_cfg, grounding_record, pretrain_record, write_shards
from shards_testutil import tiny_coco, write_jpeg, write_json


# ---------------------------------------------------------------------------------------------- COCO / Objects365
@case(3)
def coco_image_id_wrong_types(tmp, capsys):
    for bad, needle in (("abc", "id 'abc' is not an integer"), (None, "id None"), (1.5, "id 1.5")):
        ims = good_images()
        ims[0]["id"] = bad
        img_dir, cap = coco_with(tmp, ims, caption_anns())
        one_line_error(*run_shards(capsys, "coco", "--images", str(img_dir), "--captions", str(cap),
                                   "--out", str(tmp / "out"))[:2], needle)
    return "error"


@case(1)
def coco_width_not_a_number(tmp, capsys):
    ims = good_images()
    ims[1]["width"] = "abc"
    img_dir, cap = coco_with(tmp, ims, caption_anns())
    return one_line_error(*run_shards(capsys, "coco", "--images", str(img_dir), "--captions", str(cap),
                                      "--out", str(tmp / "out"))[:2], "captions.json: images[1] (id 2): width 'abc'")


@case(1)
def coco_duplicate_image_id(tmp, capsys):
    ims = good_images()
    ims[1]["id"] = 1
    img_dir, cap = coco_with(tmp, ims, caption_anns())
    return one_line_error(*run_shards(capsys, "coco", "--images", str(img_dir), "--captions", str(cap),
                                      "--out", str(tmp / "out"))[:2], "duplicate image id 1")


@case(1)
def coco_annotation_image_id_float(tmp, capsys):
    anns = caption_anns()
    anns[0]["image_id"] = 1.5
    img_dir, cap = coco_with(tmp, good_images(), anns)
    return one_line_error(*run_shards(capsys, "coco", "--images", str(img_dir), "--captions", str(cap),
                                      "--out", str(tmp / "out"))[:2], "annotations[0]: image_id 1.5")


@case(1)
def coco_category_id_not_a_number(tmp, capsys):
    img_dir, cap, inst = tiny_coco(tmp, n=2, size=(64, 48))
    data = json.loads(inst.read_text())
    data["annotations"][0]["category_id"] = "q"
    inst.write_text(json.dumps(data))
    return one_line_error(*run_shards(capsys, "coco", "--images", str(img_dir), "--captions", str(cap),
                                      "--instances", str(inst), "--out", str(tmp / "out"))[:2],
                          "instances.json: annotations[0]: category_id 'q'")


@case(4)
def coco_captions_of_wrong_type_nul_and_blank_are_counted(tmp, capsys):
    anns = caption_anns() + [{"id": 30, "image_id": 1, "caption": 7}, {"id": 31, "image_id": 1, "caption": "\x00\x00"},
                             {"id": 32, "image_id": 2, "caption": " \n\t"}, {"id": 33, "image_id": 2, "caption": None}]
    img_dir, cap = coco_with(tmp, good_images(), anns)
    rc, err, _ = run_shards(capsys, "coco", "--images", str(img_dir), "--captions", str(cap), "--out", str(tmp / "out"))
    m = manifest(tmp / "out")
    assert rc == 0 and m["captions"] == 2 and m["skipped"]["text_empty"] == 4, (rc, err, m)
    return "skip"


@case(2)
def coco_file_name_outside_the_images_folder_is_not_read(tmp, capsys):
    secret = write_jpeg(tmp / "secret" / "000000000009.jpg", 40, 30)
    ims = good_images()
    ims[0]["file_name"] = str(secret)                       # absolute
    ims[1]["file_name"] = "../secret/000000000009.jpg"      # climbing out
    ims[1]["id"] = 5
    anns = caption_anns()
    anns[1]["image_id"] = 5
    img_dir, cap = coco_with(tmp, ims, anns)
    (img_dir / "000000000001.jpg").unlink()
    rc, err, _ = run_shards(capsys, "coco", "--images", str(img_dir), "--captions", str(cap), "--out", str(tmp / "out"))
    m = manifest(tmp / "out")
    assert rc == 0 and m["samples"] == 0 and m["skipped"]["image_missing"] == 2, (err, m)
    return "skip"


@case(3)
def coco_bad_images_are_counted_by_reason(tmp, capsys):
    ims = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 64, "height": 48} for i in (1, 2, 3, 4)]
    anns = [{"id": 10 + i, "image_id": i, "caption": f"picture {i}"} for i in (1, 2, 3, 4)]
    img_dir, cap = coco_with(tmp, ims, anns)
    (img_dir / "000000000002.jpg").write_bytes(bomb_png())
    (img_dir / "000000000003.jpg").write_bytes(lying_jpeg())
    (img_dir / "000000000004.jpg").write_bytes(jpeg_bytes(64, 48)[:300])
    rc, err, _ = run_shards(capsys, "coco", "--images", str(img_dir), "--captions", str(cap), "--out", str(tmp / "out"))
    m = manifest(tmp / "out")
    assert rc == 0 and m["samples"] == 1, (err, m)
    assert m["skipped"]["image_too_large"] == 1 and m["skipped"]["image_truncated"] == 1, m["skipped"]
    assert m["skipped"].get("image_unreadable", 0) + m["skipped"].get("image_truncated", 0) == 2, m["skipped"]
    return "skip"


@case(2)
def objects365_duplicate_ids_and_escaping_file_name(tmp, capsys):
    img_dir = tmp / "o365"
    write_jpeg(img_dir / "patch0" / "a.jpg", 64, 48)
    write_jpeg(tmp / "outside.jpg", 64, 48)
    cats = [{"id": 1, "name": "cup"}]
    ann = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 20, 20]},
           {"id": 2, "image_id": 2, "category_id": 1, "bbox": [1, 1, 20, 20]}]
    ims = [{"id": 1, "file_name": "images/v1/patch0/a.jpg", "width": 64, "height": 48},
           {"id": 2, "file_name": "../outside.jpg", "width": 64, "height": 48}]
    good = write_json(tmp / "o.json", {"images": ims, "annotations": ann, "categories": cats})
    rc, err, _ = run_shards(capsys, "objects365", "--images", str(img_dir), "--annotations", str(good),
                            "--out", str(tmp / "out"))
    m = manifest(tmp / "out")
    assert rc == 0 and m["samples"] == 1 and m["skipped"]["image_missing"] == 1, (err, m)
    dup = write_json(tmp / "d.json", {"images": [ims[0], ims[0]], "annotations": ann, "categories": cats})
    one_line_error(*run_shards(capsys, "objects365", "--images", str(img_dir), "--annotations", str(dup),
                               "--out", str(tmp / "out2"))[:2], "d.json: images[1]: duplicate image id 1")
    return "skip"


# ---------------------------------------------------------------------------------------------- Visual Genome
def vg_with(tmp: Path, image_data: list, objects: list | None = None) -> list[str]:
    for e in image_data:
        if isinstance(e, dict) and isinstance(e.get("image_id"), int):
            write_jpeg(tmp / "vg" / "VG_100K" / f"{e['image_id']}.jpg", 64, 48)
    argv = ["vg", "--images", str(tmp / "vg"), "--image-data", str(write_json(tmp / "image_data.json", image_data)),
            "--regions", str(write_json(tmp / "regions.json", [])), "--out", str(tmp / "out")]
    if objects is not None:
        argv += ["--objects", str(write_json(tmp / "objects.json", objects))]
    return argv


def vg_image(i: int, **kw) -> dict:
    return {"image_id": i, "width": 64, "height": 48, "url": f"https://x/VG_100K/{i}.jpg", "coco_id": None, **kw}


@case(3)
def vg_names_as_a_string_and_with_nulls(tmp, capsys):
    objs = [{"image_id": 1, "objects": [
        {"x": 1, "y": 1, "w": 20, "h": 20, "names": "car", "attributes": "red"},
        {"x": 2, "y": 2, "w": 20, "h": 20, "names": [None], "attributes": ["red"]},
        {"x": 3, "y": 3, "w": 20, "h": 20, "names": [None, "tree"], "attributes": [None]}]}]
    rc, err, _ = run_shards(capsys, *vg_with(tmp, [vg_image(1)], objs))
    assert rc == 0, err
    with tarfile.open(tmp / "out" / "shard-000000.tar") as tf:
        rec = json.loads(tf.extractfile("vg-1.json").read())
    assert sorted(r["text"] for r in rec["regions"]) == ["red car", "tree"], rec["regions"]
    assert manifest(tmp / "out")["skipped"]["object_no_name"] == 1
    return "correct"


@case(4)
def vg_duplicate_and_wrong_typed_ids(tmp, capsys):
    one_line_error(*run_shards(capsys, *vg_with(tmp, [vg_image(1), vg_image(1, width=640)]))[:2],
                   "image_data.json: entry 1: duplicate image id 1")
    one_line_error(*run_shards(capsys, *vg_with(tmp, [vg_image(1, coco_id="abc")]))[:2], "coco_id 'abc'")
    one_line_error(*run_shards(capsys, *vg_with(tmp, [{**vg_image(1), "image_id": "abc"}]))[:2], "image_id 'abc'")
    one_line_error(*run_shards(capsys, *vg_with(tmp, [vg_image(1, height=1.5)]))[:2], "height 1.5")
    return "error"


@case(1)
def vg_url_folder_cannot_climb_out(tmp, capsys):
    write_jpeg(tmp / "1.jpg", 64, 48)                       # beside --images: must not be read
    e = vg_image(1, url="https://x/../1.jpg")
    argv = vg_with(tmp, [e])
    (tmp / "vg" / "VG_100K" / "1.jpg").unlink()
    rc, err, _ = run_shards(capsys, *argv)
    assert rc == 0 and manifest(tmp / "out")["skipped"].get("image_missing") == 1, err
    return "skip"


# ---------------------------------------------------------------------------------------------- img2dataset
def i2d_tar(tmp: Path, members: dict[str, bytes], stats: dict | None = None) -> Path:
    d = tmp / "i2d"
    d.mkdir(exist_ok=True)
    with tarfile.open(d / "00000.tar", "w") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    if stats is not None:
        write_json(d / "00000_stats.json", stats)
    return d


@case(3)
def img2dataset_json_members_that_are_not_objects(tmp, capsys):
    j = jpeg_bytes()
    d = i2d_tar(tmp, {"000000001.jpg": j, "000000001.txt": b"a dog", "000000001.json": b"[1, 2]",
                      "000000002.jpg": j, "000000002.txt": b"a cat", "000000002.json": b"null",
                      "000000003.jpg": j, "000000003.txt": b"a cow", "000000003.json": b'{"status": ["x"]}',
                      "000000004.jpg": j, "000000004.txt": b"a hen", "000000004.json": b'{"status": "success"}'})
    rc, err, _ = run_shards(capsys, "img2dataset", "--input", str(d), "--source", "cc3m", "--out", str(tmp / "out"))
    m = manifest(tmp / "out")
    assert rc == 0 and m["samples"] == 1 and m["skipped"]["metadata_malformed"] == 3, (err, m)
    return "skip"


@case(1)
def img2dataset_stats_counts_not_numbers(tmp, capsys):
    d = i2d_tar(tmp, {"000000001.jpg": jpeg_bytes(), "000000001.txt": b"a dog"}, stats={"count": "many"})
    return one_line_error(*run_shards(capsys, "img2dataset", "--input", str(d), "--source", "cc3m",
                                      "--out", str(tmp / "out"))[:2], "00000_stats.json: count 'many' is not a count")


@case(2)
def img2dataset_sub_folder_key_is_its_own_sample(tmp, capsys):
    j = jpeg_bytes()
    d = i2d_tar(tmp, {"000001.jpg": j, "000001.txt": b"top level", "sub/dir/000001.jpg": jpeg_bytes(value=30),
                      "sub/dir/000001.txt": b"in a folder", "sub_dir/000001.jpg": j, "sub_dir/000001.txt": b"clash"})
    rc, err, _ = run_shards(capsys, "img2dataset", "--input", str(d), "--source", "cc3m", "--out", str(tmp / "out"))
    m = manifest(tmp / "out")
    assert rc == 0 and m["samples"] == 2 and m["skipped"]["sample_key_collision"] == 1, (err, m)
    return "skip"


# ---------------------------------------------------------------------------------------------- refer
def refer_root(tmp: Path, refs: list, n_images: int = 3) -> tuple[Path, Path]:
    root, images = tmp / "refer", tmp / "train2014"
    (root / "refcoco").mkdir(parents=True, exist_ok=True)
    ims, anns = [], []
    for i in range(1, n_images + 1):
        write_jpeg(images / f"COCO_train2014_{i:012d}.jpg", 64, 48, seed=i)
        ims.append({"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "width": 64, "height": 48})
        anns.append({"id": 100 + i, "image_id": i, "category_id": 1, "bbox": [5, 5, 20, 20],
                     "segmentation": [[5, 5, 25, 5, 25, 25, 5, 25]]})
    write_json(root / "refcoco" / "instances.json", {"images": ims, "annotations": anns, "categories": []})
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return root, images


def ref(ref_id: int, image_id: int, split="train", **kw) -> dict:
    return {"ref_id": ref_id, "ann_id": 100 + (image_id if isinstance(image_id, int) else 1), "image_id": image_id,
            "split": split, "category_id": 1, "sentences": [{"sent": f"the thing {ref_id}"}], **kw}


def refcoco_argv(root: Path, images: Path, out: Path) -> list[str]:
    return ["refcoco", "--refer-root", str(root), "--dataset", "refcoco", "--split-by", "unc", "--images", str(images),
            "--out", str(out)]


@case(5)
def refer_split_names_that_are_paths_are_refused(tmp, capsys):
    victim = tmp / "victim"                                   # an existing shard set outside --out
    write_shards(victim, "coco", 2, 2)
    before = {p: p.read_bytes() for p in victim.iterdir()}
    out = tmp / "a" / "b" / "out"
    out.parent.mkdir(parents=True)
    refs = [ref(1, 1), ref(2, 2, split=str(victim)), ref(3, 3, split="../../victim"), ref(4, 1, split=""),
            ref(5, 2, split=None), ref(6, 3, split=7), ref(7, 2, split="val")]
    root, images = refer_root(tmp, refs)
    outside_before = tree(tmp, out)
    rc, err, _ = run_shards(capsys, *refcoco_argv(root, images, out))
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["train", "val"]
    assert tree(tmp, out) == outside_before                    # nothing written outside --out
    assert {p: p.read_bytes() for p in victim.iterdir()} == before
    assert manifest(out / "train")["extra"]["refused_ref_bad_split"] == 5
    return "skip"


@case(6)
def refer_wrong_typed_and_duplicate_fields(tmp, capsys):
    refs = [ref(1, 1), ref(1, 2), ref(2, 1.5), ref(3, 2, ann_id=[101]), ref(4, 3, sentences=5),
            ref(True, 3), ref(5, 3, category_id="q"), ref(6, 3)]
    root, images = refer_root(tmp, refs)
    rc, err, _ = run_shards(capsys, *refcoco_argv(root, images, tmp / "out"))
    extra = manifest(tmp / "out" / "train")["extra"]
    assert rc == 0 and manifest(tmp / "out" / "train")["refs"] == 2, err
    assert {k: v for k, v in extra.items() if k.startswith("refused_")} == {
        "refused_ref_duplicate_id": 1, "refused_ref_bad_image_id": 1, "refused_ref_bad_ann_id": 1,
        "refused_ref_bad_sentences": 1, "refused_ref_bad_ref_id": 1, "refused_ref_bad_category_id": 1}
    return "skip"


@case(2)
def refer_nothing_usable_and_crafted_pickle(tmp, capsys):
    root, images = refer_root(tmp, [ref(1, "x", split="../x")])
    one_line_error(*run_shards(capsys, *refcoco_argv(root, images, tmp / "out"))[:2], "holds no usable ref")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp / 'pwned'}",))
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([Evil()]))
    one_line_error(*run_shards(capsys, *refcoco_argv(root, images, tmp / "out"))[:2], "not a refer refs pickle")
    assert not (tmp / "pwned").exists()
    return "error"


@case(2)
def refer_instances_with_bad_sizes_and_ids(tmp, capsys):
    root, images = refer_root(tmp, [ref(1, 1)])
    inst = root / "refcoco" / "instances.json"
    data = json.loads(inst.read_text())
    data["images"][0]["width"] = "abc"
    inst.write_text(json.dumps(data))
    one_line_error(*run_shards(capsys, *refcoco_argv(root, images, tmp / "out"))[:2], "instances.json: images[0]")
    data["images"][0]["width"] = 64
    data["annotations"][0]["id"] = [1]
    inst.write_text(json.dumps(data))
    one_line_error(*run_shards(capsys, *refcoco_argv(root, images, tmp / "out"))[:2], "annotations[0]: id [1]")
    return "error"


@case(1)
def refer_uncompressed_rle_that_does_not_fit_its_size(tmp, capsys):
    root, images = refer_root(tmp, [ref(1, 1), ref(2, 2)])
    inst = root / "refcoco" / "instances.json"
    data = json.loads(inst.read_text())
    data["annotations"][0]["segmentation"] = {"size": [48, 64], "counts": [10, 5, 3]}        # sums to 18, not 3072
    inst.write_text(json.dumps(data))
    rc, err, _ = run_shards(capsys, *refcoco_argv(root, images, tmp / "out"))
    m = manifest(tmp / "out" / "train")
    assert rc == 0 and m["refs"] == 1 and m["skipped"]["ref_bad_segmentation"] == 1, (err, m)
    return "skip"


# ---------------------------------------------------------------------------------------------- writer, inspect
@case(2)
def build_never_replaces_a_shard_set_it_did_not_write(tmp, capsys):
    victim = write_shards(tmp / "out", "vg", 3, 2)
    before = {p.name: p.read_bytes() for p in victim.iterdir()}
    img_dir, cap = coco_with(tmp, good_images(), caption_anns())
    one_line_error(*run_shards(capsys, "coco", "--images", str(img_dir), "--captions", str(cap),
                               "--out", str(victim))[:2], "another command")
    assert {p.name: p.read_bytes() for p in victim.iterdir()} == before
    (victim / "manifest.json").unlink()                       # shard tars without any build record
    one_line_error(*run_shards(capsys, "coco", "--images", str(img_dir), "--captions", str(cap),
                               "--out", str(victim))[:2], "did not write")
    assert len(list(victim.glob("shard-*.tar"))) == 3
    return "error"


@case(1)
def unwritable_output_directory(tmp, capsys):
    blocker = tmp / "a_file"
    blocker.write_text("x")
    img_dir, cap = coco_with(tmp, good_images(), caption_anns())
    return one_line_error(*run_shards(capsys, "coco", "--images", str(img_dir), "--captions", str(cap),
                                      "--out", str(blocker / "out"))[:2], "a_file/out: cannot create")


@case(4)
def inspect_survives_bombs_and_lying_headers(tmp, capsys):
    for bad in (bomb_png(), lying_jpeg()):
        d = shards_with_bad_image(tmp, bad)
        rc, err, out = run_shards(capsys, "inspect", str(d), "--samples", "4")
        assert rc == 0 and "coco-1: skipped" in out, (err, out)
        rc, err, out = run_shards(capsys, "inspect", str(d), "--check")
        assert rc == 1 and "coco-1: image does not decode" in out, out
    return "skip"


@case(8)
def manifest_entries_that_escape_or_lack_fields(tmp, capsys):
    d = write_shards(tmp / "sh", "coco", 1, 2)
    m = manifest(d)
    for entry, needle in (({"samples": 2}, "name None"), ({"name": "../sh/shard-000000.tar"}, "not a plain shard"),
                          ({"name": "/etc/passwd"}, "not a plain shard"), ({"name": "shard-000000.tar", "samples": "2"},
                                                                            "samples '2'")):
        (d / "manifest.json").write_text(json.dumps({**m, "shards": [entry]}))
        one_line_error(*run_shards(capsys, "inspect", str(d))[:2], "manifest.json: shards[0]")
        from shards.stream import DataError, parse_sources
        with pytest.raises(DataError, match="shards\\[0\\]"):
            parse_sources([{"name": "coco", "shards": str(d)}])
        del needle
    return "error"


# ---------------------------------------------------------------------------------------------- loaders
@case(2)
def pretrain_loader_counts_bombs_and_lying_headers(tmp, capsys, tok):
    from shards.stream import build_pretrain_loader

    for k, bad in enumerate((bomb_png(), lying_jpeg())):
        d = shards_with_bad_image(tmp / str(k), bad)
        loader = build_pretrain_loader(data_cfg([{"name": "coco", "shards": str(d)}], batches_per_epoch=2,
                                                region_texts=0), tok, rank=0, world_size=1, epoch=0, seed=0)
        batches = list(loader)
        assert len(batches) == 2 and loader.skips["bad_image"] >= 1, loader.skips
    return "skip"


@case(4)
def pretrain_loader_hostile_records(tmp, capsys, tok):
    from shards.stream import build_pretrain_loader

    def record(source, i, rng, **kw):
        rec, jpg = pretrain_record(source, i, rng, **kw)
        if i == 1:
            rec["captions"] = "a string, not a list"           # would be read as one caption per character
        if i == 2:
            rec["regions"] = [{"bbox": ["a", 1, 2, 3], "text": "red car", "kind": "object"},
                              {"bbox": [float("nan"), 1, 5, 5], "text": "blue car", "kind": "object"}]
        if i == 3:
            rec["width"] = 0
        return rec, jpg
    d = write_shards(tmp / "sh", "coco", 1, 6, record=record)
    loader = build_pretrain_loader(data_cfg([{"name": "coco", "shards": str(d)}], batches_per_epoch=2), tok,
                                   rank=0, world_size=1, epoch=0, seed=0, record_keys=True)
    batches = list(loader)
    assert len(batches) == 2 and loader.skips["bad_json"] >= 1, loader.skips
    image_keys = [k for keys in loader.keys for k in keys[:4]]
    assert "coco-1" not in image_keys and "coco-3" not in image_keys, image_keys
    return "skip"


@case(1)
def exclude_refer_on_a_folder_without_refs(tmp, capsys):
    img_dir, cap = coco_with(tmp, good_images(), caption_anns())
    (tmp / "norefs").mkdir()
    return one_line_error(*run_shards(capsys, "coco", "--images", str(img_dir), "--captions", str(cap),
                                      "--exclude-refer", str(tmp / "norefs"), "--out", str(tmp / "out"))[:2],
                          "holds none of refcoco/refs(unc).p, refcoco+/refs(unc).p, refcocog/refs(umd).p")


@case(1)
def grounding_loader_skips_undecodable_training_images(tmp, capsys, tok):
    from shards.index import build_grounding_loader

    def record(source, i, rng, **kw):
        rec, jpg = grounding_record(source, i, rng, **kw)
        return rec, (lying_jpeg() if i == 0 else jpg)
    d = write_shards(tmp / "g", "refcoco", 1, 3, record=record, split="train")
    loader = build_grounding_loader(d, tok, train=True, batch_size=2, num_workers=0, rank=0, world_size=1, epoch=0,
                                    seed=0, image_size=64, max_len=8)
    batches = list(loader)
    assert batches and loader.skips["bad_image"] >= 1
    bad_items = {i for i, (img_i, _, _) in enumerate(loader.dataset.items) if img_i == 0}
    assert not any(int(x) in bad_items for b in batches for x in b["index"])   # never trained on grey
    return "skip"


@pytest.mark.parametrize("name, fn", CASES[__name__], ids=[n for n, _ in CASES[__name__]])
def test_bad_input(name, fn, tmp_path, capsys, request):
    run_case(name, fn, tmp_path, capsys, request)
