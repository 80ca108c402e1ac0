"""Image augmentations of both stages, on uint8 CHW tensors with `torchvision.transforms.v2`.

Randomness comes from an explicit `numpy.random.Generator` (never torch's global RNG), so a loader can
replay or skip samples deterministically. Geometry that moves boxes and masks goes through
`tv_tensors.BoundingBoxes` / `tv_tensors.Mask` and the v2 functional kernels, never hand-written.

Pretraining (X-VLM):
- `image_text_view`: random resized crop (scale 0.2-1, drawn from the stored size *before* decoding, so the
  JPEG is decoded at the smallest DCT scale that still covers the crop), horizontal flip, RandomAugment.
- `plan_region_crop` + `region_view`: a random crop that contains one chosen box; every other box is kept
  only if more than half of it survives; boxes as normalised (cx, cy, w, h) of the final image;
  photometric RandomAugment (plus X-VLM's flip with left/right swapped in the texts).
Grounding (VG-LAW): `grounding_view`: optional target-keeping crop, flip with word swap, longer side to
`size` and a letterbox (random translation in training, centred in evaluation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from shards.decode import decode_image
from shards.text import swap_left_right

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PHOTOMETRIC_OPS = ("identity", "autocontrast", "equalize", "brightness", "sharpness")
GEOMETRIC_OPS = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")
_BICUBIC = InterpolationMode.BICUBIC


def _shift_scale(mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(255 * mean, 1 / (255 * std)) as float32 [3,1,1]: `(x - shift) * scale` normalises uint8 pixels."""
    m = torch.tensor([255.0 * v for v in mean], dtype=torch.float32, device=device).view(3, 1, 1)
    s = torch.tensor([1.0 / (255.0 * v) for v in std], dtype=torch.float32, device=device).view(3, 1, 1)
    return m, s


def normalize(img: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [...,3,H,W] on any device -> float32 normalised, (x/255 - mean)/std in two in-place passes.
    The training step applies it to the uint8 batches `stack_uint8` hands over (data.normalize_in_loader
    false): the same values `normalize_batch` gives in the loader."""
    x = img.to(torch.float32)
    m, s = _shift_scale(mean, std, x.device)
    return x.sub_(m).mul_(s)


def _batch_buffer(imgs: Sequence[torch.Tensor], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised [B,3,H,W] tensor for B images of one shape; `shared=True` allocates it in shared
    memory, as torch's `default_collate` does in DataLoader workers, so sending it to the main process does
    not copy it again."""
    shape = (len(imgs), *imgs[0].shape)
    if not shared:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def normalize_batch(imgs: Sequence[torch.Tensor], mean: Sequence[float], std: Sequence[float], *,
                    shared: bool = False) -> torch.Tensor:
    """Stack uint8 [3,H,W] images (any strides, e.g. channels-last views) into one float32 [B,3,H,W]
    normalised batch, `(x/255 - mean)/std`, image by image into a preallocated output (no uint8 stack, no
    float temporary; each image's pass stays in cache); `shared` as in `_batch_buffer`."""
    out = _batch_buffer(imgs, torch.float32, shared)
    m, s = _shift_scale(mean, std)
    for o, img in zip(out, imgs):
        o.copy_(img).sub_(m).mul_(s)
    return out


def stack_uint8(imgs: Sequence[torch.Tensor], *, shared: bool = False) -> torch.Tensor:
    """Stack uint8 [3,H,W] images (any strides) into one contiguous uint8 [B,3,H,W] batch, left for the
    training step to `normalize` on its device: a quarter of the float32 batch's bytes to write in the
    worker and to hand to the main process; `shared` as in `_batch_buffer`."""
    out = _batch_buffer(imgs, torch.uint8, shared)
    for o, img in zip(out, imgs):
        o.copy_(img)
    return out


def _pil_op(img, op: str, level: float, sign: float):
    from PIL import Image, ImageEnhance, ImageOps

    grey = (128, 128, 128)
    if op == "autocontrast":
        return ImageOps.autocontrast(img)
    if op == "equalize":
        return ImageOps.equalize(img)
    if op == "brightness":
        return ImageEnhance.Brightness(img).enhance(0.1 + 1.8 * level)
    if op == "sharpness":
        return ImageEnhance.Sharpness(img).enhance(0.1 + 1.8 * level)
    if op == "shear_x":
        return img.transform(img.size, Image.AFFINE, (1, sign * 0.3 * level, 0, 0, 1, 0), fillcolor=grey)
    if op == "shear_y":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, sign * 0.3 * level, 1, 0), fillcolor=grey)
    if op == "translate_x":
        return img.transform(img.size, Image.AFFINE, (1, 0, -sign * 10 * level, 0, 1, 0), fillcolor=grey)
    if op == "translate_y":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, -sign * 10 * level), fillcolor=grey)
    if op == "rotate":
        return img.rotate(sign * 30.0 * level, fillcolor=grey)
    return img


def _draw_ops(rng: np.random.Generator, n_ops: int, geometric: bool) -> list[tuple[str, float]]:
    """RandomAugment's draws: `n_ops` ops, each kept with probability 0.5, each with a random sign."""
    ops = PHOTOMETRIC_OPS + (GEOMETRIC_OPS if geometric else ())
    chosen = []
    for k in rng.integers(0, len(ops), size=n_ops):
        apply, sign = rng.random() < 0.5, (1.0 if rng.random() < 0.5 else -1.0)
        if apply and ops[k] != "identity":
            chosen.append((ops[k], sign))
    return chosen


def rand_augment(img: torch.Tensor, rng: np.random.Generator, *, n_ops: int = 2, magnitude: int = 7,
                 geometric: bool = False) -> torch.Tensor:
    """X-VLM's `RandomAugment(2, 7)`: `n_ops` ops drawn uniformly, each applied with probability 0.5, at the
    ALBEF/X-VLM level mapping (brightness/sharpness factor 0.1 + 1.8 m/10, shear 0.3 m/10, translate 10 m/10 px,
    rotate 30 m/10 degrees, geometric signs random). uint8 [3,H,W] in and out.

    The ops run in Pillow: on 224-px uint8 images torchvision's tensor kernels measured 3-20x slower here
    (rotate 6.3 vs 0.3 ms, affine 5.7 vs 0.4 ms, equalize 2.5 vs 0.8 ms). No boxes move with these ops."""
    return _flip_and_augment(img, False, _draw_ops(rng, n_ops, geometric), magnitude)


def _flip_and_augment(img: torch.Tensor, flip: bool, ops: list[tuple[str, float]],
                      magnitude: int = 7) -> torch.Tensor:
    """Horizontal flip, then the RandomAugment `ops`, of a uint8 [3,H,W] image (any strides). With ops the
    image goes to Pillow once (flip included) and comes back as a channels-last view [3,H,W] of an HWC
    array; without ops no copy is made beyond the flip."""
    if not ops:
        return img.flip(-1) if flip else img
    from PIL import Image

    hwc = img.permute(1, 2, 0)
    pil = Image.fromarray(hwc.numpy() if hwc.is_contiguous() else np.ascontiguousarray(hwc.numpy()))
    if flip:
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for op, sign in ops:
        pil = _pil_op(pil, op, magnitude / 10.0, sign)
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1)


def resize_crop(img: torch.Tensor, top: int, left: int, height: int, width: int, size: int) -> torch.Tensor:
    """`F.resized_crop(..., size=[size, size], bicubic, antialias)` of a uint8 [3,H,W] image, returning a
    channels-last view [3,S,S] (an HWC array underneath, what Pillow and the batch normaliser read).

    The crop is copied to a contiguous HWC block first: for a channels-last uint8 input torch's
    antialiased resampling then runs its native channels-last kernel and keeps the layout (measured 1.6x
    faster than on a strided crop, which also needs an HWC copy afterwards). Same pixels as `F.resized_crop`."""
    crop = img[:, top:top + height, left:left + width].permute(1, 2, 0).contiguous().permute(2, 0, 1)
    return F.resize(crop, [size, size], interpolation=_BICUBIC, antialias=True)


# ----------------------------------------------------------------------------------------------
# Image-text view
# ----------------------------------------------------------------------------------------------
def resized_crop_params(width: int, height: int, rng: np.random.Generator,
                        scale: tuple[float, float] = (0.2, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's `RandomResizedCrop.get_params` drawn from `rng`: (x, y, w, h) in stored pixels."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height                              # fallback: central crop
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _min_decode_size(width: int, height: int, crop_w: float, crop_h: float, out: int) -> tuple[int, int]:
    """Smallest full-image size whose crop still has >= `out` pixels on both sides (for DCT downscaling)."""
    s = min(1.0, max(out / max(crop_w, 1e-6), out / max(crop_h, 1e-6)))
    return math.ceil(width * s), math.ceil(height * s)


def _decode_for_crop(data: bytes, width: int, height: int, crop: tuple[float, float, float, float],
                     size: int, decoder: str, reduce: bool) -> tuple[torch.Tensor, float, float]:
    """Decode (downscaled when allowed) and return (image, sx, sy): decoded px = stored px * (sx, sy)."""
    min_size = _min_decode_size(width, height, crop[2], crop[3], size) if reduce else None
    img = decode_image(data, decoder, min_size)
    return img, img.shape[-1] / width, img.shape[-2] / height


@dataclass
class ViewParams:
    """Everything random about one image's view, drawn before decoding: the crop (x, y, w, h) in stored
    pixels, the flip and the RandomAugment ops. The CPU path applies them right away; with data.decode_on=gpu
    the workers ship them with the JPEG bytes and shards.device_decode applies them on the device."""
    crop: tuple[int, int, int, int]
    flip: bool
    ops: list = field(default_factory=list)


def image_text_params(width: int, height: int, rng: np.random.Generator, *, scale: tuple[float, float] = (0.2, 1.0),
                      hflip_prob: float = 0.5, augment: bool = True) -> ViewParams:
    """The draws of `image_text_view`, in its order (crop, flip, ops): the same rng gives the same view."""
    crop = resized_crop_params(width, height, rng, scale)
    flip = bool(rng.random() < hflip_prob)
    return ViewParams(crop, flip, _draw_ops(rng, 2, True) if augment else [])


def image_text_view(data: bytes, width: int, height: int, rng: np.random.Generator, *, size: int = 224,
                    decoder: str = "pil", reduce: bool = True, scale: tuple[float, float] = (0.2, 1.0),
                    hflip_prob: float = 0.5, augment: bool = True) -> tuple[torch.Tensor, bool]:
    """Random resized crop + flip + RandomAugment of one stored image: (uint8 [3,S,S], flipped)."""
    x, y, w, h = resized_crop_params(width, height, rng, scale)
    flip = bool(rng.random() < hflip_prob)
    img, sx, sy = _decode_for_crop(data, width, height, (x, y, w, h), size, decoder, reduce)
    img = resize_crop(img, int(round(y * sy)), int(round(x * sx)), max(1, int(round(h * sy))),
                      max(1, int(round(w * sx))), size)
    img = _flip_and_augment(img, flip, _draw_ops(rng, 2, True) if augment else [])
    return img, flip


# ----------------------------------------------------------------------------------------------
# Region view
# ----------------------------------------------------------------------------------------------
@dataclass
class RegionPlan:
    """A region crop decided from the JSON alone (before decoding): crop (x0, y0, x1, y1) in stored pixels,
    the kept (text, box [x, y, w, h] in stored pixels, clipped to the crop) pairs, and the flip."""
    crop: tuple[int, int, int, int]
    texts: list[str] = field(default_factory=list)
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    flip: bool = False


def plan_region_crop(width: int, height: int, regions: Sequence[tuple[Sequence[float], str]],
                     rng: np.random.Generator, *, max_texts: int = 5, hflip_prob: float = 0.5) -> Optional[RegionPlan]:
    """X-VLM's region sampling: a random crop containing one randomly chosen box; boxes visited in random order
    and kept when > 50% of their area survives, up to `max_texts`. Returns None if no valid box."""
    valid = [(b, t) for b, t in regions if b[2] > 0 and b[3] > 0 and b[0] >= 0 and b[1] >= 0
             and b[0] + b[2] <= width + 1e-3 and b[1] + b[3] <= height + 1e-3]
    if not valid:
        return None
    bx, by, bw, bh = valid[int(rng.integers(0, len(valid)))][0]
    x0 = int(rng.integers(0, math.floor(bx) + 1))
    y0 = int(rng.integers(0, math.floor(by) + 1))
    x1 = int(rng.integers(min(math.ceil(bx + bw), width), width + 1))
    y1 = int(rng.integers(min(math.ceil(by + bh), height), height + 1))
    plan = RegionPlan(crop=(x0, y0, x1, y1), flip=bool(rng.random() < hflip_prob))
    for k in rng.permutation(len(valid)):
        if len(plan.texts) >= max_texts:
            break
        (x, y, w, h), text = valid[k]
        ix0, iy0, ix1, iy1 = max(x0, x), max(y0, y), min(x1, x + w), min(y1, y + h)
        if ix1 > ix0 and iy1 > iy0 and (ix1 - ix0) * (iy1 - iy0) > 0.5 * w * h:
            plan.texts.append(swap_left_right(text) if plan.flip else text)
            plan.boxes.append((ix0, iy0, ix1 - ix0, iy1 - iy0))
    return plan


def region_view(data: bytes, width: int, height: int, plan: RegionPlan, rng: np.random.Generator, *,
                size: int = 224, decoder: str = "pil", reduce: bool = True,
                augment: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a `RegionPlan`: (uint8 [3,S,S], boxes float32 [n,4] as normalised (cx, cy, w, h))."""
    x0, y0, x1, y1 = plan.crop
    img, sx, sy = _decode_for_crop(data, width, height, (x0, y0, x1 - x0, y1 - y0), size, decoder, reduce)
    (top, left, ch, cw), boxes = region_geometry(plan, width, height, img.shape[-2], img.shape[-1], size)
    img = resize_crop(img, top, left, ch, cw, size)             # the same crop, on the pixels
    img = _flip_and_augment(img, plan.flip, _draw_ops(rng, 2, False) if augment else [])
    return img, boxes


def region_geometry(plan: RegionPlan, width: int, height: int, dh: int, dw: int, size: int
                    ) -> tuple[tuple[int, int, int, int], torch.Tensor]:
    """A region plan on an image decoded at dh x dw (the stored size, or a DCT-downscaled one): the crop
    (top, left, height, width) in decoded pixels and the kept boxes as normalised (cx, cy, w, h) of the final
    `size` x `size` view (flip applied), through torchvision's v2 box kernels."""
    x0, y0, x1, y1 = plan.crop
    sx, sy = dw / width, dh / height
    boxes = tv_tensors.BoundingBoxes(torch.tensor(plan.boxes, dtype=torch.float32).reshape(-1, 4),
                                     format="XYWH", canvas_size=(height, width))
    if (dh, dw) != (height, width):                              # a DCT-downscaled decode
        boxes = F.resize(boxes, [dh, dw])
    top, left = int(round(y0 * sy)), int(round(x0 * sx))
    ch, cw = max(1, int(round((y1 - y0) * sy))), max(1, int(round((x1 - x0) * sx)))
    boxes = F.resized_crop(boxes, top=top, left=left, height=ch, width=cw, size=[size, size])   # v2 box kernels
    if plan.flip:
        boxes = F.horizontal_flip(boxes)
    boxes = F.convert_bounding_box_format(boxes, new_format="CXCYWH").as_subclass(torch.Tensor) / size
    return (top, left, ch, cw), boxes.clamp_(0.0, 1.0)


def region_params(plan: RegionPlan, rng: np.random.Generator, *, augment: bool = True) -> ViewParams:
    """The draws of `region_view` (its photometric ops) as a ViewParams with the plan's crop (x, y, w, h)."""
    x0, y0, x1, y1 = plan.crop
    return ViewParams((x0, y0, x1 - x0, y1 - y0), plan.flip, _draw_ops(rng, 2, False) if augment else [])


# ----------------------------------------------------------------------------------------------
# Grounding view (VG-LAW)
# ----------------------------------------------------------------------------------------------
def grounding_view(img: torch.Tensor, box_xywh: Sequence[float], mask: torch.Tensor, text: str, *,
                   train: bool, size: int = 448, rng: Optional[np.random.Generator] = None,
                   flip_prob: float = 0.5, crop_prob: float = 0.5, crop_allowed: bool = True,
                   fill: Sequence[int] = (124, 116, 104), extra_boxes: Sequence[Sequence[float]] = (),
                   extra_masks: Optional[torch.Tensor] = None) -> dict:
    """Letterbox one grounding example (image uint8 [3,H,W], target box in stored px, mask uint8 [H,W]).

    Training: a crop that keeps the target with probability `crop_prob` (only when `crop_allowed`, i.e. no
    direction words), a flip with probability `flip_prob` (left/right swapped in `text`), longer side to
    `size`, letterbox at a random offset. Evaluation: longer side to `size`, centred letterbox.
    Returns image uint8 [3,S,S], bbox normalised (cx, cy, w, h), mask uint8 [S,S], text, scale, offset
    (input px = stored px * scale + offset; exact for evaluation, it ignores a training flip), flipped, and
    crop: the kept window (x0, y0, x1, y1) in stored px, or None when the view was not cropped.

    `extra_boxes` (K boxes [x, y, w, h], stored px) and `extra_masks` (uint8 [K,H,W]) go through the same
    geometry (a crop keeps `box_xywh`, so pass the union of the targets there); they come back as "boxes"
    [K,4] (normalised cx, cy, w, h) and "masks" [K,S,S]."""
    if train and rng is None:
        raise ValueError("grounding_view(train=True) needs an rng")
    H, W = img.shape[-2:]
    image = tv_tensors.Image(img)
    rows = [list(box_xywh)] + [list(b) for b in extra_boxes]
    boxes = tv_tensors.BoundingBoxes(torch.tensor(rows, dtype=torch.float32), format="XYWH", canvas_size=(H, W))
    boxes = F.convert_bounding_box_format(boxes, new_format="XYXY")
    masks = tv_tensors.Mask(mask[None] if extra_masks is None else torch.cat([mask[None], extra_masks.to(mask.dtype)]))
    ox, oy, flipped, window = 0.0, 0.0, False, None
    if train and crop_allowed and rng.random() < crop_prob:
        bx, by, bw, bh = box_xywh
        x0 = int(rng.integers(0, math.floor(max(bx, 0)) + 1))
        y0 = int(rng.integers(0, math.floor(max(by, 0)) + 1))
        x1 = int(rng.integers(min(math.ceil(bx + bw), W), W + 1))
        y1 = int(rng.integers(min(math.ceil(by + bh), H), H + 1))
        image, boxes, masks = (F.crop(t, top=y0, left=x0, height=y1 - y0, width=x1 - x0) for t in (image, boxes, masks))
        ox, oy, window = float(x0), float(y0), (x0, y0, x1, y1)
    if train and rng.random() < flip_prob:
        image, boxes, masks = (F.horizontal_flip(t) for t in (image, boxes, masks))
        text = swap_left_right(text)
        flipped = True
    h, w = image.shape[-2:]
    scale = size / max(h, w)
    nh, nw = min(size, max(1, int(round(h * scale)))), min(size, max(1, int(round(w * scale))))
    image, boxes, masks = (F.resize(t, [nh, nw], antialias=True) for t in (image, boxes, masks))
    if train:
        pad_x, pad_y = int(rng.integers(0, size - nw + 1)), int(rng.integers(0, size - nh + 1))
    else:
        pad_x, pad_y = (size - nw) // 2, (size - nh) // 2
    padding = [pad_x, pad_y, size - nw - pad_x, size - nh - pad_y]
    image = F.pad(image, padding, fill=list(fill))
    boxes = F.pad(boxes, padding)
    masks = F.pad(masks, padding, fill=0)
    all_boxes = F.convert_bounding_box_format(boxes, new_format="CXCYWH").as_subclass(torch.Tensor) / size
    bbox = all_boxes[0]
    sx, sy = nw / w, nh / h                      # equal up to rounding of the resized size
    masks = masks.as_subclass(torch.Tensor)
    out = {
        "image": image.as_subclass(torch.Tensor), "bbox": bbox.clamp(0.0, 1.0),
        "mask": masks[0], "text": text,
        "scale": float((sx + sy) / 2), "offset": (pad_x - ox * sx, pad_y - oy * sy), "flipped": flipped,
        "crop": window,
    }
    if len(rows) > 1 or extra_masks is not None:
        out["boxes"] = all_boxes[1:].clamp(0.0, 1.0)
        out["masks"] = masks[1:]
    return out
