"""JPEG decoding with optional DCT-domain downscaling, to a uint8 CHW tensor.

Decoders (bench/loader.py measures them side by side):
- "pil": Pillow; with `min_size`, `Image.draft` lets libjpeg decode at 1/2, 1/4 or 1/8 scale directly.
- "simplejpeg": libjpeg-turbo through simplejpeg; `min_width/min_height` give the same DCT scaling.
- "torchvision": `torchvision.io.decode_jpeg` (CPU; no downscaled decode). The batched nvjpeg path for GPUs
  is `decode_batch_cuda`.
`min_size=(w, h)` asks for the smallest DCT-scaled image that is still at least that large, so the result
may be smaller than the stored image: callers map stored-pixel geometry by the returned size.
"""
from __future__ import annotations

import io
from typing import Optional, Sequence

import numpy as np
import torch

DECODERS = ("pil", "simplejpeg", "torchvision")


class DecodeError(ValueError):
    """The bytes are not a decodable JPEG/image (counted as a skipped sample by the loaders)."""


def decode_image(data: bytes, decoder: str = "pil", min_size: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Decode image bytes to an RGB uint8 tensor [3,H,W]; `min_size=(w, h)` allows a DCT-downscaled decode."""
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
    except (OSError, RuntimeError, SyntaxError) as e:
        raise DecodeError(str(e)) from None
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


def _decode_pil(data: bytes, min_size: Optional[tuple[int, int]]) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if min_size is not None and img.format == "JPEG":
            img.draft("RGB", (max(1, int(min_size[0])), max(1, int(min_size[1]))))
        return np.array(img.convert("RGB"))


def _decode_simplejpeg(data: bytes, min_size: Optional[tuple[int, int]]) -> np.ndarray:
    import simplejpeg

    if not simplejpeg.is_jpeg(data):        # PNG etc. in a shard: fall back to Pillow
        return _decode_pil(data, None)
    if min_size is None:
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    return simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=int(min_size[0]), min_height=int(min_size[1]))


def decode_batch_cuda(datas: Sequence[bytes], device: str = "cuda") -> list[torch.Tensor]:
    """Batched nvjpeg decode on the GPU (`torchvision.io.decode_jpeg(list, device=...)`), RGB uint8 [3,H,W]."""
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
