"""Region crops (X-VLM) and grounding letterbox/flip/crop (VG-LAW) keep boxes, masks and pixels together."""
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from shards.augment import grounding_view, image_text_view, plan_region_crop, region_view


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
BOXES = [(40, 30, 120, 90), (300, 200, 150, 110), (500, 40, 100, 300), (150, 330, 200, 120)]


def _scene(w=640, h=480):
    img = Image.new("RGB", (w, h), (0, 0, 0))
    d = ImageDraw.Draw(img)
    for (x, y, bw, bh), c in zip(BOXES, COLOURS):
        d.rectangle([x, y, x + bw - 1, y + bh - 1], fill=c)
    return img


@pytest.mark.parametrize("decoder,reduce", [("pil", True), ("simplejpeg", True), ("pil", False)])
def test_region_crops_inside_half_kept_and_match_pixels(decoder, reduce):
    pytest.importorskip("simplejpeg") if decoder == "simplejpeg" else None
    data = _jpeg(_scene())
    regions = [(b, f"box {i}") for i, b in enumerate(BOXES)]
    rng = np.random.default_rng(0)
    size, n_checked = 64, 0
    for _ in range(40):
        plan = plan_region_crop(640, 480, regions, rng, max_texts=5)
        x0, y0, x1, y1 = plan.crop
        for (bx, by, bw, bh), t in zip(plan.boxes, plan.texts):
            k = int(t.split()[1])
            ox, oy, ow, oh = BOXES[k]
            assert x0 <= bx and y0 <= by and bx + bw <= x1 and by + bh <= y1        # inside the crop
            assert bw * bh > 0.5 * ow * oh                                           # > 50% kept
        img, boxes = region_view(data, 640, 480, plan, rng, size=size, decoder=decoder, reduce=reduce, augment=False)
        assert img.shape == (3, size, size) and boxes.shape == (len(plan.texts), 4)
        assert (boxes >= 0).all() and (boxes <= 1).all()
        for (cx, cy, w, h), t in zip(boxes.tolist(), plan.texts):
            colour = torch.tensor(COLOURS[int(t.split()[1])], dtype=torch.float32)
            if w * size < 6 or h * size < 6:
                continue
            # the pixels at the predicted box's centre and just inside its corners have the box's colour
            for fx, fy in ((0.5, 0.5), (0.15, 0.15), (0.85, 0.85), (0.15, 0.85), (0.85, 0.15)):
                px = int((cx - w / 2 + fx * w) * size)
                py = int((cy - h / 2 + fy * h) * size)
                got = img[:, py, px].float()
                assert (got - colour).abs().max() < 60, (t, got, colour)
            # and just outside the box (where the crop has black background around isolated boxes) it is not
            n_checked += 1
    assert n_checked > 20


def test_region_plan_flip_swaps_words_and_mirrors_box():
    data = _jpeg(_scene())
    rng = np.random.default_rng(3)
    seen = 0
    for _ in range(30):
        plan = plan_region_crop(640, 480, [(BOXES[0], "red box on the left")], rng, hflip_prob=0.5)
        img, boxes = region_view(data, 640, 480, plan, rng, size=64, augment=False)
        cx = boxes[0, 0].item()
        x0, _, x1, _ = plan.crop
        bx, _, bw, _ = plan.boxes[0]
        unflipped = (bx + bw / 2 - x0) / (x1 - x0)
        if plan.flip:
            seen += 1
            assert plan.texts == ["red box on the right"]
            assert abs(cx - (1 - unflipped)) < 0.02
        else:
            assert plan.texts == ["red box on the left"] and abs(cx - unflipped) < 0.02
    assert 0 < seen < 30


def test_image_text_view_shape_and_reduced_decode():
    data = _jpeg(_scene())
    rng = np.random.default_rng(0)
    for _ in range(5):
        img, flipped = image_text_view(data, 640, 480, rng, size=48)
        assert img.shape == (3, 48, 48) and img.dtype == torch.uint8 and isinstance(flipped, bool)


def _grounding_inputs():
    img = torch.from_numpy(np.array(_scene())).permute(2, 0, 1).contiguous()
    mask = torch.zeros(480, 640, dtype=torch.uint8)
    x, y, w, h = BOXES[1]
    mask[y:y + h, x:x + w] = 1
    return img, mask, BOXES[1]


def _check_consistent(out, size, colour):
    m = out["mask"]
    ys, xs = torch.nonzero(m, as_tuple=True)
    cx, cy, w, h = (out["bbox"] * size).tolist()
    # the box is the mask's extent, and the image under the mask has the target's colour
    assert abs(xs.min().item() - (cx - w / 2)) <= 1.5 and abs(xs.max().item() + 1 - (cx + w / 2)) <= 1.5
    assert abs(ys.min().item() - (cy - h / 2)) <= 1.5 and abs(ys.max().item() + 1 - (cy + h / 2)) <= 1.5
    inner = out["image"][:, ys, xs].float().mean(1)
    assert (inner - torch.tensor(colour, dtype=torch.float32)).abs().max() < 40


def test_grounding_eval_letterbox_is_centred_and_invertible():
    img, mask, box = _grounding_inputs()
    out = grounding_view(img, box, mask, "the green box", train=False, size=448)
    assert out["image"].shape == (3, 448, 448) and out["mask"].shape == (448, 448)
    assert out["offset"] == (0.0, (448 - 336) / 2) and abs(out["scale"] - 0.7) < 1e-6
    _check_consistent(out, 448, COLOURS[1])
    x, y, w, h = box
    cx, cy, bw, bh = (out["bbox"] * 448).tolist()
    # input px = stored px * scale + offset
    assert abs((cx - bw / 2) - (x * out["scale"] + out["offset"][0])) < 1
    assert abs((cy - bh / 2) - (y * out["scale"] + out["offset"][1])) < 1


def test_grounding_flip_swaps_words_and_mirrors_box_and_mask():
    img, mask, box = _grounding_inputs()
    rng = np.random.default_rng(0)
    flips = 0
    for _ in range(12):
        out = grounding_view(img, box, mask, "the green box on the left", train=True, size=448, rng=rng,
                             flip_prob=0.5, crop_prob=0.5)
        _check_consistent(out, 448, COLOURS[1])
        if out["flipped"]:
            flips += 1
            assert out["text"] == "the green box on the right"
            # the green box sits right of centre in the scene; mirrored, its centre lies left of the yellow one
        else:
            assert out["text"] == "the green box on the left"
    assert 0 < flips < 12


def test_grounding_flip_mirrors_position():
    img, mask, box = _grounding_inputs()
    a = grounding_view(img, box, mask, "x", train=True, size=448, rng=np.random.default_rng(0), flip_prob=0.0, crop_prob=0.0)
    b = grounding_view(img, box, mask, "x", train=True, size=448, rng=np.random.default_rng(0), flip_prob=1.0, crop_prob=0.0)
    # same random letterbox offset (same rng draws); mirrored within the resized image of width 448
    assert abs(b["bbox"][0].item() - (1 - a["bbox"][0].item())) < 0.01
    assert torch.equal(b["mask"], a["mask"].flip(-1))


def test_grounding_crop_keeps_target():
    img, mask, box = _grounding_inputs()
    rng = np.random.default_rng(5)
    for _ in range(8):
        out = grounding_view(img, box, mask, "green box", train=True, size=448, rng=rng, flip_prob=0.0, crop_prob=1.0)
        _check_consistent(out, 448, COLOURS[1])
        assert out["mask"].sum() >= 0.99 * (out["bbox"][2] * out["bbox"][3] * 448 * 448).item() * 0.95


def _reference_views(data, width, height, seed, plan=None, decoder="pil", reduce=True, size=64):
    """The views as first written: `F.resized_crop` on the decoded tensor, `F.horizontal_flip`, then
    `rand_augment`, all through tv_tensors (boxes included); the fast path must give the same pixels."""
    from torchvision import tv_tensors
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    from shards.augment import _decode_for_crop, rand_augment, resized_crop_params

    rng, bic = np.random.default_rng(seed), InterpolationMode.BICUBIC
    if plan is None:
        x, y, w, h = resized_crop_params(width, height, rng)
        flip = bool(rng.random() < 0.5)
        img, sx, sy = _decode_for_crop(data, width, height, (x, y, w, h), size, decoder, reduce)
        img = F.resized_crop(img, top=int(round(y * sy)), left=int(round(x * sx)), height=max(1, int(round(h * sy))),
                             width=max(1, int(round(w * sx))), size=[size, size], interpolation=bic, antialias=True)
        img = F.horizontal_flip(img) if flip else img
        return rand_augment(img, rng, geometric=True), flip
    x0, y0, x1, y1 = plan.crop
    img, sx, sy = _decode_for_crop(data, width, height, (x0, y0, x1 - x0, y1 - y0), size, decoder, reduce)
    img = tv_tensors.Image(img)
    boxes = tv_tensors.BoundingBoxes(torch.tensor(plan.boxes, dtype=torch.float32).reshape(-1, 4), format="XYWH",
                                     canvas_size=(height, width))
    boxes = F.resize(boxes, list(img.shape[-2:]))
    top, left = int(round(y0 * sy)), int(round(x0 * sx))
    ch, cw = max(1, int(round((y1 - y0) * sy))), max(1, int(round((x1 - x0) * sx)))
    img, boxes = (F.resized_crop(t, top=top, left=left, height=ch, width=cw, size=[size, size], interpolation=bic,
                                 antialias=True) for t in (img, boxes))
    if plan.flip:
        img, boxes = F.horizontal_flip(img), F.horizontal_flip(boxes)
    boxes = F.convert_bounding_box_format(boxes, new_format="CXCYWH").as_subclass(torch.Tensor) / size
    return rand_augment(img.as_subclass(torch.Tensor), rng, geometric=False), boxes.clamp_(0.0, 1.0)


@pytest.mark.parametrize("decoder,reduce", [("pil", True), ("pil", False), ("simplejpeg", True)])
def test_fast_views_equal_the_reference_composition(decoder, reduce):
    """Crop-then-resize in channels-last, flip inside the one Pillow round trip, DCT-scaled decode: the same
    pixels, flips and boxes as the plain v2 composition, for the same random draws."""
    pytest.importorskip("simplejpeg") if decoder == "simplejpeg" else None
    rng = np.random.default_rng(5)
    noise = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    data = _jpeg(Image.blend(_scene(), Image.fromarray(noise).resize((640, 480), Image.BICUBIC), 0.5))
    regions = [(b, f"box {i}") for i, b in enumerate(BOXES)]
    n_reduced = 0
    for seed in range(30):
        img, flip = image_text_view(data, 640, 480, np.random.default_rng(seed), size=96, decoder=decoder,
                                    reduce=reduce)
        ref, ref_flip = _reference_views(data, 640, 480, seed, decoder=decoder, reduce=reduce, size=96)
        assert flip == ref_flip and img.shape == ref.shape == (3, 96, 96) and torch.equal(img, ref)
        plan = plan_region_crop(640, 480, regions, np.random.default_rng(seed + 100))
        img, boxes = region_view(data, 640, 480, plan, np.random.default_rng(seed), size=96, decoder=decoder,
                                 reduce=reduce)
        ref, ref_boxes = _reference_views(data, 640, 480, seed, plan=plan, decoder=decoder, reduce=reduce, size=96)
        assert torch.equal(img, ref) and torch.allclose(boxes, ref_boxes, atol=1e-6)
        x0, y0, x1, y1 = plan.crop
        n_reduced += reduce and min(x1 - x0, y1 - y0) >= 2 * 96
    assert n_reduced > 0 or not reduce                    # the DCT-downscaled path was exercised


def test_dct_downscaled_region_view_matches_full_decode():
    """A 1/2, 1/4 or 1/8-scale decode gives the same output size and the same boxes (to a fraction of a
    pixel) as the full decode, and nearly the same pixels."""
    data = _jpeg(_scene())
    regions = [(b, f"box {i}") for i, b in enumerate(BOXES)]
    size, n = 64, 0
    for seed in range(30):
        plan = plan_region_crop(640, 480, regions, np.random.default_rng(seed))
        full, fb = region_view(data, 640, 480, plan, np.random.default_rng(0), size=size, reduce=False, augment=False)
        red, rb = region_view(data, 640, 480, plan, np.random.default_rng(0), size=size, reduce=True, augment=False)
        assert full.shape == red.shape == (3, size, size) and fb.shape == rb.shape
        assert (fb - rb).abs().max() * size < 2.0                       # boxes within 2 output pixels
        assert (full.float() - red.float()).abs().mean() < 6
        x0, y0, x1, y1 = plan.crop
        n += min(x1 - x0, y1 - y0) >= 2 * size
    assert n > 5


@pytest.mark.parametrize("shared", [False, True])
def test_normalize_batch_equals_stack_then_normalize(shared):
    from shards.augment import CLIP_MEAN, CLIP_STD, normalize, normalize_batch

    g = torch.Generator().manual_seed(0)
    hwc = [torch.randint(0, 256, (20, 24, 3), dtype=torch.uint8, generator=g) for _ in range(3)]
    imgs = [hwc[0].permute(2, 0, 1), hwc[1].permute(2, 0, 1).contiguous(), hwc[2].permute(2, 0, 1).flip(-1)]
    out = normalize_batch(imgs, CLIP_MEAN, CLIP_STD, shared=shared)
    ref = normalize(torch.stack(imgs), CLIP_MEAN, CLIP_STD)
    assert out.shape == (3, 3, 20, 24) and out.dtype == torch.float32 and out.is_contiguous()
    assert torch.allclose(out, ref, atol=1e-6) and out.is_shared() == shared
