"""JPEG decoding: DCT-downscaled decodes use only the fast 1/2, 1/4, 1/8 scales and agree across decoders."""
import io

import numpy as np
import pytest
from PIL import Image

from shards.decode import dct_scale, decode_image


def _jpeg(w, h, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((w, h), Image.BICUBIC).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("w,h", [(640, 480), (333, 251), (17, 9)])
def test_dct_scale_is_the_largest_power_of_two_that_still_covers(w, h):
    assert dct_scale(w, h, None) == 1
    for mw in range(1, w + 1, 7):
        mh = max(1, mw * h // w)
        d = dct_scale(w, h, (mw, mh))
        assert d in (1, 2, 4, 8)
        assert -(-w // d) >= mw and -(-h // d) >= mh                      # still covers
        if d < 8:                                                          # the next scale would not
            assert -(-w // (2 * d)) < mw or -(-h // (2 * d)) < mh


@pytest.mark.parametrize("decoder", ["pil", "simplejpeg"])
def test_reduced_decode_sizes_and_pixels(decoder):
    if decoder == "simplejpeg":
        pytest.importorskip("simplejpeg")
    data = _jpeg(640, 480)
    full = decode_image(data, decoder).float()
    for ms, d in (((640, 480), 1), ((400, 300), 1), ((320, 240), 2), ((300, 100), 2), ((100, 60), 4), ((10, 10), 8)):
        img = decode_image(data, decoder, ms)
        assert tuple(img.shape) == (3, 480 // d, 640 // d), (ms, d)
        if d > 1:   # a DCT-scaled decode is the image, smaller: close to an area-average of the full decode
            pooled = full.reshape(3, 480 // d, d, 640 // d, d).mean((2, 4))
            assert (img.float() - pooled).abs().mean() < 4
