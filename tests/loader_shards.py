"""Tiny schema-conformant shards for the loader tests (plain USTAR tars, as shards.build writes them).

Images are small PIL-drawn JPEGs; every sample's JSON follows DESIGN.md's shard schema, and each directory
gets a manifest.json with the fields the loaders read (shards with sample counts, caption/region counts).
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import tarfile
from PIL import Image, ImageDraw

WORDS = "a the red blue green small large man woman dog cat car tree sign on left right near of with".split()


def jpeg(width: int, height: int, rng: np.random.Generator, boxes: Optional[list] = None) -> bytes:
    img = Image.new("RGB", (width, height), tuple(int(c) for c in rng.integers(0, 80, 3)))
    d = ImageDraw.Draw(img)
    for (x, y, w, h) in boxes or []:
        d.rectangle([x, y, x + w - 1, y + h - 1], fill=tuple(int(c) for c in rng.integers(120, 256, 3)))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def sentence(rng: np.random.Generator, n: Optional[int] = None) -> str:
    n = n or int(rng.integers(3, 9))
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))


def pretrain_record(source: str, i: int, rng: np.random.Generator, *, size=(64, 48), captions=True,
                    regions=True) -> tuple[dict, bytes]:
    w, h = size
    boxes = []
    for _ in range(int(rng.integers(1, 5))):
        bw, bh = int(rng.integers(8, w // 2)), int(rng.integers(8, h // 2))
        boxes.append([int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh)), bw, bh])
    rec = {"schema": 1, "source": source, "image_id": str(i), "width": w, "height": h,
           "orig_width": w, "orig_height": h}
    if captions:
        rec["captions"] = [sentence(rng) + "." for _ in range(2)]
    if regions:
        rec["regions"] = [{"bbox": b, "text": sentence(rng, 2), "kind": "object"} for b in boxes]
    return rec, jpeg(w, h, rng, boxes)


def write_shards(out: Path, source: str, n_shards: int, per_shard: int, *, seed: int = 0,
                 record: Callable = pretrain_record, **kw) -> Path:
    """Write `n_shards` x `per_shard` samples of `source` under `out` with a manifest; return `out`."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards, n_caps, n_regs, i = [], 0, 0, 0
    for s in range(n_shards):
        name = f"shard-{s:06d}.tar"
        with tarfile.open(out / name, "w", format=tarfile.USTAR_FORMAT) as tw:
            for _ in range(per_shard):
                rec, jpg = record(source, i, rng, **kw)
                n_caps += len(rec.get("captions", []))
                n_regs += len(rec.get("regions", []))
                for ext, data in (("jpg", jpg), ("json", json.dumps(rec).encode())):
                    info = tarfile.TarInfo(f"{source}-{i}.{ext}")
                    info.size = len(data)
                    tw.addfile(info, io.BytesIO(data))
                i += 1
        shards.append({"name": name, "samples": per_shard})
    manifest = {"schema": 1, "source": source, "samples": i, "captions": n_caps, "regions": n_regs,
                "refs": 0, "sentences": 0, "shards": shards, "skipped": {}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def data_cfg(sources: list[dict], **kw) -> dict:
    """A PretrainDataConfig-like mapping with tiny sizes."""
    cfg = dict(sources=sources, batch_size=4, region_texts=6, region_images=3, texts_per_image=5, image_size=32,
               max_words=12, max_masks=8, mask_prob=0.25, num_workers=0, shuffle_buffer=8, batches_per_epoch=4,
               decoder="pil")
    cfg.update(kw)
    return cfg


def grounding_record(source: str, i: int, rng: np.random.Generator, *, size=(96, 64), n_refs=2,
                     sentences=(1, 3), split: str = "val", ref_base: int = 0) -> tuple[dict, bytes]:
    """An image with `n_refs` coloured boxes, each a ref with a mask RLE and 1-3 sentences."""
    from pycocotools import mask as mask_utils

    w, h = size
    boxes, refs = [], []
    for r in range(n_refs):
        bw, bh = int(rng.integers(10, w // 2)), int(rng.integers(10, h // 2))
        x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        boxes.append([x, y, bw, bh])
        m = np.zeros((h, w), dtype=np.uint8)
        m[y:y + bh, x:x + bw] = 1
        rle = mask_utils.encode(np.asfortranarray(m))
        k = int(rng.integers(sentences[0], sentences[1] + 1))
        refs.append({"ref_id": ref_base + i * 10 + r, "ann_id": i * 10 + r, "category_id": 1, "split": split,
                     "bbox": [x, y, bw, bh], "sentences": [sentence(rng) for _ in range(k)],
                     "mask": {"size": [h, w], "counts": rle["counts"].decode("ascii")}})
    rec = {"schema": 1, "source": source, "image_id": str(i), "width": w, "height": h, "orig_width": w,
           "orig_height": h, "refs": refs}
    return rec, jpeg(w, h, rng, boxes)
