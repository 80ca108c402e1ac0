"""Masks on disk: COCO RLE as the shard schema stores it ({"size": [h, w], "counts": <ascii str>})."""
from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


def encode_mask(mask: np.ndarray) -> dict:
    """Binary mask [h, w] -> compressed COCO RLE with str counts (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_mask(rle: dict) -> np.ndarray:
    """COCO RLE (compressed str/bytes counts or uncompressed list counts) -> bool [h, w]."""
    counts = rle.get("counts")
    if isinstance(counts, list):
        rle = mask_utils.frPyObjects(rle, *rle["size"])
    elif isinstance(counts, str):
        rle = {"size": rle["size"], "counts": counts.encode("ascii")}
    return mask_utils.decode(rle).astype(bool)
