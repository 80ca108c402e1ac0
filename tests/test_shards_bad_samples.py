"""The bad-sample corpus: every case is repaired or skipped, and counted, never written silently wrong."""
from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib

from PIL import Image

from shards.build import Item, build_shards
from shards.images import MAX_PIXELS
from shards.inspect import check_dir
from tests.shards_testutil import photo


def _png_bomb(path, side: int) -> None:
    """A real decompression bomb: a valid greyscale PNG of side x side zeros, a few hundred KB on disk."""
    def chunk(t: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + t + data + struct.pack(">I", zlib.crc32(t + data) & 0xFFFFFFFF)
    comp, row = zlib.compressobj(9), b"\x00" * (side + 1)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_bad_sample_corpus(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    good = io.BytesIO()
    photo(200, 150).save(good, "JPEG", quality=90)
    files = {
        "ok": good.getvalue(),
        "unreadable": b"this is not an image at all",
        "truncated": good.getvalue()[: len(good.getvalue()) // 2],
        "empty": b"",
    }
    for name, data in files.items():
        (raw / f"{name}.jpg").write_bytes(data)
    photo(200, 150).convert("CMYK").save(raw / "cmyk.jpg", "JPEG")
    photo(200, 150).convert("L").save(raw / "grey.jpg", "JPEG")
    photo(200, 150).save(raw / "png_named.jpg", "PNG")
    side = int(MAX_PIXELS ** 0.5) + 100
    _png_bomb(raw / "bomb.jpg", side)
    assert (raw / "bomb.jpg").stat().st_size < 2_000_000

    def item(name, image=None, **rec):
        rec = {"source": "bad", "image_id": name, "captions": ["fine caption"], **rec}
        return Item(f"bad-{name}", str(raw / f"{image or name}.jpg"), rec)

    items = [
        item("ok", regions=[
            {"bbox": [150, 100, 100, 100], "text": "half outside", "kind": "region"},   # clipped to 50x50
            {"bbox": [250, 10, 20, 20], "text": "fully outside", "kind": "region"},     # nothing left: dropped
            {"bbox": [10, 10, 0, 30], "text": "zero width", "kind": "region"},          # zero area: dropped
            {"bbox": [10, 10, 20, 20], "text": "   ", "kind": "region"},                # empty text: dropped
            {"bbox": [10, 10, 20, 20], "text": "bad \udcff byte", "kind": "region"},    # not UTF-8: dropped
            {"bbox": [10, 10, "x", 20], "text": "malformed box", "kind": "region"}]),
        item("unreadable"), item("truncated"), item("empty"), item("missing"), item("bomb"),
        item("cmyk"), item("grey"), item("png_named"),
        item("textless", "ok", captions=["", " \n ", "caf\udce9"]),   # nothing valid left: sample skipped
        item("badref", "ok", refs=[
            {"ref_id": 1, "split": "val", "bbox": [1, 1, 5, 5], "sentences": ["x"], "segmentation": [[1, 2, 3]]},
            {"ref_id": 2, "split": "val", "bbox": [1, 1, 5, 5], "sentences": ["y"],
             "segmentation": {"size": [3], "counts": "??"}},
            {"ref_id": 3, "split": "val", "bbox": [1, 1, 5, 5], "sentences": [" "], "segmentation": [[1, 1, 5, 1, 5, 5]]}]),
        Item("bad-noid", str(raw / "ok.jpg"), {"source": "bad", "captions": ["no image_id"]}),  # odd record
    ]
    m = build_shards(items, tmp_path / "out", source="bad", args={}, max_side=None)
    assert m["samples"] == 5  # ok, cmyk, grey, png_named, badref (its caption survives, its refs do not)
    assert m["skipped"] == {"image_unreadable": 2, "image_truncated": 1, "image_missing": 1, "image_too_large": 1,
                            "box_zero_area": 2, "text_empty": 4, "text_not_utf8": 2, "box_malformed": 1,
                            "no_annotations": 1, "ref_bad_segmentation": 2, "ref_no_sentences": 1,
                            "sample_error": 1}
    assert m["repaired"] == {"box_clipped": 1, "image_cmyk_to_rgb": 1, "image_grey_to_rgb": 1, "image_not_jpeg": 1}
    assert check_dir(tmp_path / "out") == []
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tf:
        recs = {n: json.loads(tf.extractfile(n).read()) for n in tf.getnames() if n.endswith(".json")}
        for n in tf.getnames():
            if n.endswith(".jpg"):
                im = Image.open(io.BytesIO(tf.extractfile(n).read()))
                assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (200, 150))
    assert sorted(recs) == ["bad-badref.json", "bad-cmyk.json", "bad-grey.json", "bad-ok.json", "bad-png_named.json"]
    assert "refs" not in recs["bad-badref.json"]
    assert recs["bad-ok.json"]["regions"] == [{"bbox": [150.0, 100.0, 50.0, 50.0], "text": "half outside",
                                               "kind": "region"}]
    assert "warning: bad-noid: skipped (KeyError" in capsys.readouterr().err
