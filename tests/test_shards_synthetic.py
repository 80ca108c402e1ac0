"""The synthetic raw-data generator: determinism, unambiguous referring expressions (checked against
objects rebuilt from the written files and pixels), and the raw formats as their own readers see them."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools.coco import COCO

from shards.refer import load_refs
from shards.synthetic import FAMILIES, generate
from shards.synthetic_scene import COLORS, SIZE_THRESHOLD
from shards.synthetic_text import parse, resolve
from tests.shards_testutil import SeenObject

N_IMAGES = 10


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synthetic") / "raw"
    return out, generate(out, seed=0, images=N_IMAGES)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_per_seed(raw, tmp_path):
    out, summary = raw
    again = generate(tmp_path / "again", seed=0, images=N_IMAGES)
    first, second = _files(out), _files(tmp_path / "again")
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []
    assert {k: v for k, v in again.items() if k != "out"} == {k: v for k, v in summary.items() if k != "out"}
    other = _files(Path(generate(tmp_path / "other", seed=1, images=N_IMAGES)["out"]))
    assert other["coco/annotations/instances_train2017.json"] != first["coco/annotations/instances_train2017.json"]
    assert other["refer/refcoco/refs(unc).p"] != first["refer/refcoco/refs(unc).p"]


def test_rejects_too_few_images(tmp_path):
    from shards.inputs import InputError  # what the CLI prints as one line with exit code 2

    with pytest.raises(ValueError, match="at least 8") as e:
        generate(tmp_path, images=3)
    assert isinstance(e.value, InputError)


def _pixel_color(pixels: np.ndarray, mask: np.ndarray) -> str:
    inner = mask.copy()  # shrink by 2 px so JPEG ringing at the border does not count
    for axis in (0, 1):
        for shift in (-2, 2):
            inner &= np.roll(mask, shift, axis)
    med = np.median(pixels[inner].astype(float), axis=0)
    return min(COLORS, key=lambda c: float(np.sum((med - np.array(COLORS[c])) ** 2)))


def test_every_expression_names_exactly_its_target(raw):
    out, summary = raw
    refer = out / "refer"
    refs = load_refs(refer / "refcoco" / "refs(unc).p")
    coco = COCO(str(refer / "refcoco" / "instances.json"))
    cat_names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    n_sent = 0
    kinds = set()
    for image_id in sorted({r["image_id"] for r in refs}):
        info = coco.loadImgs(image_id)[0]
        pixels = np.asarray(Image.open(refer / "images" / "train2014" / info["file_name"]).convert("RGB"))
        side = min(info["width"], info["height"])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        seen = []
        for a in anns:
            color_name, shape = cat_names[a["category_id"]].split()
            color = _pixel_color(pixels, coco.annToMask(a).astype(bool))
            assert color == color_name, (image_id, a["id"])  # the drawing shows the annotated colour
            size = "large" if max(a["bbox"][2:]) > SIZE_THRESHOLD * side else "small"
            seen.append(SeenObject(shape, color, size, a["bbox"]))
        index = {a["id"]: i for i, a in enumerate(anns)}
        for r in (r for r in refs if r["image_id"] == image_id):
            family = FAMILIES.get(r["split"])
            assert family is None or seen[index[r["ann_id"]]].shape in family
            assert 1 <= len(r["sentences"]) <= 3 and r["sent_ids"] == [s["sent_id"] for s in r["sentences"]]
            for s in r["sentences"]:
                assert s["tokens"] == s["sent"].split() and s["raw"].lower().rstrip(".") == s["sent"]
                assert resolve(s["sent"], seen, side) == [index[r["ann_id"]]], (image_id, s["sent"])
                assert resolve(s["raw"], seen, side) == [index[r["ann_id"]]]
                kinds.add(parse(s["sent"]).kind)
                n_sent += 1
    assert n_sent == sum(v["sentences"] for v in summary["refcoco"].values() if isinstance(v, dict))
    assert kinds == {"attribute", "superlative", "relation"}
    assert {r["split"] for r in refs} == {"train", "val", "testA", "testB"}


def test_resolver_reports_ambiguity():
    twins = [SeenObject("circle", "red", "small", [10, 10, 30, 30]),
             SeenObject("circle", "red", "small", [100, 12, 30, 30]),
             SeenObject("square", "blue", "large", [60, 100, 60, 60])]
    assert resolve("the red circle", twins, 200) == [0, 1]
    assert resolve("the leftmost red circle", twins, 200) == [0]
    assert resolve("the red circle right of the blue square", twins, 200) == [1]
    assert resolve("the red circle above the blue square", twins, 200) == [0, 1]
    with pytest.raises(ValueError, match="unexpected word"):
        parse("the red circle near the square")


def test_coco_files_read_by_pycocotools(raw):
    out, summary = raw
    ann_dir = out / "coco" / "annotations"
    caps = json.loads((ann_dir / "captions_train2017.json").read_text())
    assert "categories" not in caps
    per_image = {}
    for a in caps["annotations"]:
        per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
    assert len(per_image) == N_IMAGES and all(5 <= n <= 6 for n in per_image.values())
    assert any(a["caption"] != a["caption"].strip() for a in caps["annotations"])
    assert any(a["caption"][0].isupper() for a in caps["annotations"])

    coco = COCO(str(ann_dir / "instances_train2017.json"))
    ids = sorted(c["id"] for c in coco.dataset["categories"])
    assert len(ids) == 30 and ids[-1] > 30 and 12 not in ids  # COCO-like gaps
    crowd = [a for a in coco.dataset["annotations"] if a["iscrowd"]]
    assert len(crowd) == summary["coco"]["crowd"] >= 1
    assert all(isinstance(a["segmentation"]["counts"], list) for a in crowd)
    for a in coco.dataset["annotations"]:
        img = coco.imgs[a["image_id"]]
        m = coco.annToMask(a)
        assert m.shape == (img["height"], img["width"])
        assert m.sum() == pytest.approx(a["area"], abs=1e-6)
        x, y, w, h = a["bbox"]
        ys, xs = np.nonzero(m)
        assert xs.min() >= int(x) - 1 and xs.max() <= x + w + 1 and ys.min() >= int(y) - 1 and ys.max() <= y + h + 1
        if not a["iscrowd"]:
            assert len(a["segmentation"][0]) >= 6 and min(w, h) >= min(img["width"], img["height"]) / 9
    circles = [a for a in coco.dataset["annotations"] if not a["iscrowd"]
               and coco.cats[a["category_id"]]["name"].endswith("circle")]
    assert circles and all(len(a["segmentation"][0]) >= 64 for a in circles)
    for img in coco.dataset["images"]:
        with Image.open(out / "coco" / "train2017" / img["file_name"]) as im:
            assert im.size == (img["width"], img["height"]) and im.format == "JPEG"

    # refer images are COCO images: same ids, same pixels
    refer_inst = json.loads((out / "refer" / "refcoco" / "instances.json").read_text())
    for img in refer_inst["images"]:
        a = (out / "refer" / "images" / "train2014" / img["file_name"]).read_bytes()
        assert a == (out / "coco" / "train2017" / f"{img['id']:012d}.jpg").read_bytes()
    coco_anns = {a["id"]: a for a in coco.dataset["annotations"]}
    assert all(coco_anns[a["id"]] == a for a in refer_inst["annotations"])


def test_vg_files(raw):
    out, summary = raw
    vg = out / "vg"
    image_data = json.loads((vg / "image_data.json").read_text())
    regions = json.loads((vg / "region_descriptions.json").read_text())
    objects = json.loads((vg / "objects.json").read_text())
    by_id = {d["image_id"]: d for d in image_data}
    for d in image_data:
        folder = d["url"].split("/")[-2]
        with Image.open(vg / folder / f"{d['image_id']}.jpg") as im:
            assert im.size == (d["width"], d["height"])
    assert {d["url"].split("/")[-2] for d in image_data} == {"VG_100K", "VG_100K_2"}
    assert all("id" in r and "image_id" not in r for r in regions)
    orphans = [r["id"] for r in regions if r["id"] not in by_id]
    assert len(orphans) == 1
    for r in regions:
        for reg in r["regions"]:
            assert {"region_id", "image_id", "phrase", "x", "y", "width", "height"} <= reg.keys()
    # refer val/test images reach VG through coco_id: the exclusion has something to remove
    eval_ids = {r["image_id"] for r in load_refs(out / "refer" / "refcoco" / "refs(unc).p") if r["split"] != "train"}
    linked = {d["coco_id"] for d in image_data if d["coco_id"] is not None}
    assert len(linked) == summary["vg"]["with_coco_id"] and linked & eval_ids
    objs = [o for e in objects for o in e["objects"]]
    assert all({"object_id", "x", "y", "w", "h", "names", "synsets"} <= o.keys() and isinstance(o["names"], list)
               for o in objs)
    with_attr = [o for o in objs if "attributes" in o]
    assert 0 < len(with_attr) < len(objs)


def test_img2dataset_output(raw):
    out, summary = raw
    cc = out / "cc3m"
    table = pq.read_table(cc / "00000.parquet").to_pylist()
    with tarfile.open(cc / "00000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    ok = [r for r in table if r["status"] == "success"]
    failed = [r for r in table if r["status"] != "success"]
    assert failed and all(r["status"] == "failed_to_download" and r["error_message"] for r in failed)
    assert all(f"{r['key']}.jpg" not in members for r in failed)
    assert len(members) == 3 * len(ok)
    for r in ok:
        meta = json.loads(members[f"{r['key']}.json"])
        assert meta == r and len(r["key"]) == 9
        assert members[f"{r['key']}.txt"].decode() == r["caption"]
        with Image.open(io.BytesIO(members[f"{r['key']}.jpg"])) as im:
            assert im.size == (256, 256) == (r["width"], r["height"])
        assert max(r["original_width"], r["original_height"]) > 256
    assert members[f"{ok[0]['key']}.json"].decode().startswith('{\n    "url"')  # pretty-printed, indent 4
    stats = json.loads((cc / "00000_stats.json").read_text())
    assert (stats["count"], stats["successes"], stats["failed_to_download"]) == (len(table), len(ok), len(failed))
    assert summary["cc3m"]["successes"] == len(ok)


def test_objects365_path_quirk(raw):
    out, summary = raw
    root = out / "objects365"
    data = json.loads((root / "zhiyuan_objv2_train.json").read_text())
    present = 0
    for img in data["images"]:
        assert img["file_name"].startswith("images/v2/patch")
        assert not (root / img["file_name"]).exists()  # the listed path is not the extracted layout
        patch, base = img["file_name"].split("/")[-2:]
        present += (root / patch / base).is_file()
    assert present == len(data["images"]) - summary["objects365"]["missing_images"]
    assert {img["file_name"].split("/")[2] for img in data["images"]} == {"patch0", "patch1"}
    assert any(c["name"] != c["name"].strip() for c in data["categories"])
    assert all(c["name"].strip().istitle() for c in data["categories"])
    assert any(a["area"] == 0 for a in data["annotations"])
    assert all({"isfake", "isreflected"} <= a.keys() for a in data["annotations"])


def test_refer_converter_reads_the_synthetic_refer_layout(raw, tmp_path):
    from shards.build import build_shards
    from shards.refer import excluded_image_ids, refcoco_items

    out, summary = raw
    refer = out / "refer"
    by_split, skips, counts = refcoco_items(refer, "refcoco", "unc", refer / "images" / "train2014")
    assert skips == {}
    expected = {k: v for k, v in summary["refcoco"].items() if isinstance(v, dict)}
    assert {s: (len(items), sum(len(it.record["refs"]) for it in items)) for s, items in by_split.items()} == \
        {s: (v["images"], v["refs"]) for s, v in expected.items()}
    ids, prov = excluded_image_ids(refer)
    assert len(ids) == summary["refcoco"]["non_train_images"] and prov["files"][0]["file"] == "refcoco/refs(unc).p"
    assert ids == {int(it.record["image_id"]) for s, items in by_split.items() if s != "train" for it in items}
    m = build_shards(by_split["val"], tmp_path / "val", source="refcoco", args={}, max_side=None)
    assert m["refs"] == expected["val"]["refs"] and m["sentences"] == expected["val"]["sentences"]
