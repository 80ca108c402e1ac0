"""What an image's header says, checked before any pixel is decoded (shared by the writer and the readers).

Three ways an image file lies or overreaches, each a counted skip wherever images are read:
- more pixels than PIL's decompression-bomb limit (`MAX_PIXELS`, ~89.5 MP; PIL warns above it and refuses
  above twice it: both are refused here);
- a JPEG whose header claims more pixels than its bytes can hold: every 8x8 block of the luma plane costs at
  least one bit of entropy-coded data, so a file shorter than (blocks / 8) bytes cannot be that large. libjpeg
  meets such a file's end early, warns and pads, and Pillow then returns a flat grey image without a word;
- a header that cannot be parsed at all.
"""
from __future__ import annotations

import io
import math
import warnings

from PIL import Image, UnidentifiedImageError

MAX_PIXELS: int = 89_478_485  # PIL's own threshold (Image.MAX_IMAGE_PIXELS)


class HeaderProblem(ValueError):
    """The header is unreadable or not to be trusted; `reason` is the skip-count key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def size_problem(fmt: str | None, width: int, height: int, nbytes: int, max_pixels: int = MAX_PIXELS
                 ) -> tuple[str, str] | None:
    """(reason, detail) when a `fmt` image of `width` x `height` in `nbytes` bytes cannot be used, else None."""
    if width <= 0 or height <= 0:
        return "image_unreadable", f"size {width}x{height}"
    if width * height > max_pixels:
        return "image_too_large", f"{width}x{height} pixels > {max_pixels} (decompression bomb limit)"
    if fmt == "JPEG":
        blocks = math.ceil(width / 8) * math.ceil(height / 8)
        if nbytes * 8 < blocks:
            return "image_truncated", (f"header claims {width}x{height} pixels but the file holds {nbytes} bytes, "
                                       f"fewer than one bit per 8x8 block")
    return None


def open_checked(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """`Image.open` (header only) of `data`, after the checks above; raises HeaderProblem."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise HeaderProblem("image_too_large", str(e)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, TypeError) as e:
        raise HeaderProblem("image_unreadable", str(e) or type(e).__name__) from None
    p = size_problem(im.format, im.size[0], im.size[1], len(data), max_pixels)
    if p is not None:
        raise HeaderProblem(*p)
    return im
