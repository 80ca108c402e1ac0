"""Masks on disk: COCO RLE as the shard schema stores it ({"size": [h, w], "counts": <ascii str>})."""
from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


def encode_mask(mask: np.ndarray) -> dict:
    """Binary mask [h, w] -> compressed COCO RLE with str counts (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_mask(rle: dict) -> np.ndarray:
    """COCO RLE (compressed str/bytes counts or uncompressed list counts) -> bool [h, w].

    ValueError for an RLE that does not describe exactly its own size: a bad `size`, uncompressed counts that are
    not non-negative integers summing to h*w, or compressed counts that are not ASCII or decode to another length
    (pycocotools itself would return a garbage mask for some of these)."""
    if not isinstance(rle, dict):
        raise ValueError("RLE is not an object")
    size, counts = rle.get("size"), rle.get("counts")
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise ValueError(f"RLE size {size!r:.40} is not [height, width]")
    h, w = size
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise ValueError("uncompressed RLE counts must be non-negative integers")
        if sum(counts) != h * w:
            raise ValueError(f"uncompressed RLE counts sum to {sum(counts)}, not {h}x{w} = {h * w}")
        rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    elif isinstance(counts, (str, bytes)):
        try:
            data = counts.encode("ascii") if isinstance(counts, str) else counts
            data.decode("ascii")
        except (UnicodeEncodeError, UnicodeDecodeError):
            raise ValueError("compressed RLE counts are not ASCII") from None
        rle = {"size": [h, w], "counts": data}
        if int(mask_utils.area(rle)) > h * w:
            raise ValueError("compressed RLE covers more than its size")
    else:
        raise ValueError(f"RLE counts of type {type(counts).__name__}")
    m = mask_utils.decode(rle)
    if m.shape != (h, w):
        raise ValueError(f"RLE decodes to {m.shape}, not {(h, w)}")
    return m.astype(bool)
