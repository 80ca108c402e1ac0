"""Robust image loading for shard building: open, repair, downscale and re-encode one image.

Everything a million-image job meets once in a while is either repaired here (CMYK, grey, palette or PNG
bytes behind a ``.jpg`` name -> RGB) or rejected with a ``BadImage`` whose reason the writer counts
(unreadable, truncated, decompression bomb). JPEG sources are downscaled in the decoder with
``Image.draft`` (libjpeg's DCT scaling by 1/2, 1/4 or 1/8, never below the target size) and then resized
exactly, which is several times faster than decoding at full size and visually equivalent.
"""
from __future__ import annotations

import io
import warnings

from PIL import Image, ImageFile

from shards.schema import JPEG_QUALITY

from shards.imagecheck import MAX_PIXELS, HeaderProblem, open_checked  # noqa: E402  (MAX_PIXELS re-exported)
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not decode as grey padding


class BadImage(Exception):
    """An image that cannot be used; ``reason`` is the skip-count key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def fit_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """Size with the longer side at most ``max_side`` (aspect kept, rounded, at least 1 px)."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    s = max_side / max(width, height)
    return max(1, round(width * s)), max(1, round(height * s))


def load_rgb(data: bytes, name: str = "", max_side: int | None = None,
             max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, tuple[int, int], list[str]]:
    """Decode ``data`` to an RGB image whose longer side is at most ``max_side``.

    Returns ``(image, (orig_width, orig_height), repairs)``, where ``repairs`` names each fix applied
    (``image_not_jpeg``, ``image_cmyk_to_rgb``, ``image_grey_to_rgb``, ``image_mode_<M>_to_rgb``).
    Raises ``BadImage`` with reason ``image_unreadable``, ``image_truncated`` or ``image_too_large``.
    """
    repairs: list[str] = []
    try:
        im = open_checked(data, max_pixels)
    except HeaderProblem as e:
        raise BadImage(e.reason, e.detail) from None
    orig = im.size
    if name.lower().endswith((".jpg", ".jpeg")) and im.format != "JPEG":
        repairs.append("image_not_jpeg")
    target = fit_size(*orig, max_side)
    try:
        if im.format == "JPEG" and target != orig:
            im.draft(im.mode, target)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("image_too_large", str(e)) from None
    except OSError as e:
        reason = "image_truncated" if "truncated" in str(e) else "image_unreadable"
        raise BadImage(reason, str(e)) from None
    except (ValueError, SyntaxError, EOFError, MemoryError) as e:
        raise BadImage("image_unreadable", str(e)) from None
    if im.mode != "RGB":
        mode = im.mode
        repairs.append({"CMYK": "image_cmyk_to_rgb", "L": "image_grey_to_rgb", "LA": "image_grey_to_rgb",
                        "1": "image_grey_to_rgb", "I;16": "image_grey_to_rgb"}.get(
                            mode, f"image_mode_{mode.replace(';', '')}_to_rgb"))
        if mode in ("I;16", "I;16B", "I;16L", "I"):
            im = im.point(lambda v: v / 256).convert("L")  # 16-bit grey: scale to 8 bits, not clip
        elif mode in ("P", "PA") and "transparency" in im.info:
            im = im.convert("RGBA")
        im = im.convert("RGB")
    if im.size != target:
        im = im.resize(target, Image.Resampling.BICUBIC)
    return im, orig, repairs


def encode_jpeg(im: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    """Deterministic baseline JPEG bytes of an RGB image."""
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()
