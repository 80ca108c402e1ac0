"""JPEG decoding with optional DCT-domain downscaling, to a uint8 CHW tensor.

Decoders (bench/loader.py measures them side by side):
- "pil": Pillow; with `min_size`, `Image.draft` lets libjpeg decode at 1/2, 1/4 or 1/8 scale directly.
- "simplejpeg": libjpeg-turbo through simplejpeg; `min_width/min_height` give the same DCT scaling.
- "torchvision": `torchvision.io.decode_jpeg` (CPU; no downscaled decode). The batched nvjpeg path for GPUs
  is `decode_batch_cuda`.
`min_size=(w, h)` asks for the smallest DCT-scaled image that is still at least that large, so the result
may be smaller than the stored image: callers map stored-pixel geometry by the returned size. Only the
power-of-two scales 1/2, 1/4 and 1/8 are used (`dct_scale`): libjpeg-turbo's other M/8 scales (7/8, 3/4,
5/8, 3/8) have no SIMD IDCT and measured up to 2x *slower* than a full decode here (640x480, quality 90:
full 666/s, 7/8 339/s, 3/4 485/s, 5/8 463/s, 1/2 701/s); Pillow's `draft` only offers those scales anyway.
"""
from __future__ import annotations

import io
from typing import Optional, Sequence

import numpy as np
import torch

from shards.imagecheck import HeaderProblem, open_checked

DECODERS = ("pil", "simplejpeg", "torchvision")


class DecodeError(ValueError):
    """The bytes are not a decodable JPEG/image (counted as a skipped sample by the loaders)."""


def decode_image(data: bytes, decoder: str = "pil", min_size: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Decode image bytes to an RGB uint8 tensor [3,H,W]; `min_size=(w, h)` allows a DCT-downscaled decode.
    Every failure is a `DecodeError`: unreadable or truncated data, a decompression bomb, a JPEG header that
    claims more pixels than the file can hold (`shards.imagecheck`)."""
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r} (choose one of {', '.join(DECODERS)})")
    try:
        open_checked(data)
    except HeaderProblem as e:
        raise DecodeError(str(e)) from None
    try:
        if decoder == "simplejpeg":
            arr = _decode_simplejpeg(data, min_size)
        elif decoder == "torchvision":
            from torchvision.io import ImageReadMode, decode_jpeg
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        elif decoder == "pil":
            arr = _decode_pil(data, min_size)
        else:
            raise ValueError(f"unknown decoder {decoder!r} (choose one of {', '.join(DECODERS)})")
    except ValueError as e:
        if str(e).startswith("unknown decoder"):
            raise
        raise DecodeError(str(e)) from None
    except ImportError:                         # a decoder that is not installed is not a bad image
        raise
    except (OSError, RuntimeError, SyntaxError, EOFError, MemoryError, Exception) as e:  # noqa: BLE001
        # decoders raise many types on hostile bytes (PIL's DecompressionBombError is a bare Exception)
        raise DecodeError(f"{type(e).__name__}: {e}") from None
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


def dct_scale(width: int, height: int, min_size: Optional[tuple[int, int]]) -> int:
    """The largest denominator d in (8, 4, 2, 1) whose 1/d-scaled decode (ceil(width/d) x ceil(height/d), as
    libjpeg rounds) is still at least `min_size`; 1 (full size) when `min_size` is None."""
    if min_size is None:
        return 1
    for d in (8, 4, 2):
        if -(-width // d) >= min_size[0] and -(-height // d) >= min_size[1]:
            return d
    return 1


def _decode_pil(data: bytes, min_size: Optional[tuple[int, int]]) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        d = dct_scale(*img.size, min_size) if img.format == "JPEG" else 1
        if d > 1:                            # draft picks the largest 1/2^k scale with size // request >= 2^k
            img.draft("RGB", (max(1, img.size[0] // d), max(1, img.size[1] // d)))
        return np.array(img.convert("RGB"))


def _decode_simplejpeg(data: bytes, min_size: Optional[tuple[int, int]]) -> np.ndarray:
    import simplejpeg

    if not simplejpeg.is_jpeg(data):        # PNG etc. in a shard: fall back to Pillow
        return _decode_pil(data, None)
    if min_size is not None:
        h, w = simplejpeg.decode_jpeg_header(data)[:2]
        d = dct_scale(w, h, min_size)
        if d > 1:                            # exactly the 1/d scale (never a slow M/8 one)
            return simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=-(-w // d), min_height=-(-h // d))
    return simplejpeg.decode_jpeg(data, colorspace="RGB")


def decode_batch_cuda(datas: Sequence[bytes], device: str = "cuda") -> list[torch.Tensor]:
    """Batched nvjpeg decode on the GPU (`torchvision.io.decode_jpeg(list, device=...)`), RGB uint8 [3,H,W]."""
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
