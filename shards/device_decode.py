"""`data.decode_on: gpu`: the loader's workers ship JPEG bytes and view parameters; the images are decoded and
augmented here, on the training device, a batch at a time.

    batch = finish_batch(batch, device, settings)     # in the main process, per batch from the workers

Workers (shards.stream) draw every random choice of a view before decoding, exactly as the CPU path draws it
(`shards.augment.ViewParams`: crop, flip, RandomAugment ops) and send, per image part ("image",
"region_image"): `<part>_jpeg` (list of uint8 byte tensors), `<part>_view` (int64 [N, 7]: crop x, y, w, h in
stored pixels, flip, stored width, height) and `<part>_ops` (the ops, per image). Here
`torchvision.io.decode_jpeg(list, device=...)` decodes the whole list in one call (nvjpeg's batched decode
on CUDA; libjpeg-turbo with device="cpu", the same code path, which the tests compare with the CPU loader),
then each image is cropped and resized (`shards.augment.resize_crop`: bicubic, antialiased), flipped, and
given its ops with torchvision's tensor kernels (autocontrast, equalize, brightness, sharpness) and, for the
geometric ops, Pillow's affine mapping (pixel centres, nearest neighbour, grey fill) evaluated on the device.
The result equals the CPU path's batch within resampling tolerance: the images are always decoded at full
size (the CPU path may decode at 1/2-1/8 scale, `data.decode_reduce`) and kernels round differently.
A JPEG the batched decode rejects is decoded alone; one that fails alone is replaced by another image of the
batch and counted (`bad_image`), as the CPU path does.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torchvision.transforms.v2 import functional as F

from shards.augment import normalize, resize_crop

PARTS = ("image", "region_image")
GREY = 128.0
LEVEL = 0.7                  # RandomAugment(2, 7): magnitude 7 / 10, as shards.augment applies it


def jpeg_tensor(data: bytes) -> torch.Tensor:
    """The compressed bytes as a uint8 tensor (what decode_jpeg takes; pickles cheaply to the main process)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def view_row(params: Any, width: int, height: int) -> list[int]:
    """One row of `<part>_view` from a shards.augment.ViewParams."""
    x, y, w, h = params.crop
    return [int(x), int(y), int(w), int(h), int(params.flip), int(width), int(height)]


def decode_all(jpegs: Sequence[torch.Tensor], device: torch.device) -> tuple[list[torch.Tensor | None], int]:
    """Batched decode to RGB uint8 [3,H,W] on `device`; failures come back as None (and are counted)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return list(decode_jpeg(list(jpegs), mode=ImageReadMode.RGB, device=device)), 0
    except RuntimeError:
        out: list[torch.Tensor | None] = []
        for j in jpegs:
            try:
                out.append(decode_jpeg(j, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out, sum(x is None for x in out)


def pil_affine(img: torch.Tensor, matrix: Sequence[float], fill: float = GREY) -> torch.Tensor:
    """Pillow's `Image.transform(size, AFFINE, matrix, NEAREST, fillcolor=fill)` of a uint8 [3,H,W] tensor:
    output pixel (x, y) takes input pixel floor(a(x+.5) + b(y+.5) + c, d(x+.5) + e(y+.5) + f), fill outside."""
    a, b, c, d, e, f = matrix
    _, h, w = img.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=img.device, dtype=torch.float64) + 0.5,
                            torch.arange(w, device=img.device, dtype=torch.float64) + 0.5, indexing="ij")
    u = torch.floor(a * xs + b * ys + c).long()
    v = torch.floor(d * xs + e * ys + f).long()
    inside = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    out = img[:, v.clamp(0, h - 1), u.clamp(0, w - 1)]
    return torch.where(inside, out, torch.tensor(int(fill), dtype=img.dtype, device=img.device))


def _rotate_matrix(angle_deg: float, w: int, h: int) -> list[float]:
    """Pillow's `Image.rotate(angle)` matrix (about the centre, no expand)."""
    angle = -math.radians(angle_deg % 360.0)
    m = [round(math.cos(angle), 15), round(math.sin(angle), 15), 0.0,
         round(-math.sin(angle), 15), round(math.cos(angle), 15), 0.0]
    cx, cy = w / 2.0, h / 2.0
    m[2] = m[0] * -cx + m[1] * -cy + m[2] + cx
    m[5] = m[3] * -cx + m[4] * -cy + m[5] + cy
    return m


def apply_op(img: torch.Tensor, op: str, sign: float, level: float = LEVEL) -> torch.Tensor:
    """One RandomAugment op on a uint8 [3,H,W] tensor, at shards.augment's PIL levels."""
    if op == "autocontrast":
        return F.autocontrast(img)
    if op == "equalize":
        return F.equalize(img)
    if op == "brightness":
        return F.adjust_brightness(img, 0.1 + 1.8 * level)
    if op == "sharpness":
        return F.adjust_sharpness(img, 0.1 + 1.8 * level)
    if op == "shear_x":
        return pil_affine(img, (1, sign * 0.3 * level, 0, 0, 1, 0))
    if op == "shear_y":
        return pil_affine(img, (1, 0, 0, sign * 0.3 * level, 1, 0))
    if op == "translate_x":
        return pil_affine(img, (1, 0, -sign * 10 * level, 0, 1, 0))
    if op == "translate_y":
        return pil_affine(img, (1, 0, 0, 0, 1, -sign * 10 * level))
    if op == "rotate":
        if (sign * 30.0 * level) % 360.0 == 0:
            return img
        return pil_affine(img, _rotate_matrix(sign * 30.0 * level, img.shape[-1], img.shape[-2]))
    return img


def decode_views(jpegs: Sequence[torch.Tensor], views: torch.Tensor, ops: Sequence[Sequence], size: int,
                 device: torch.device) -> tuple[torch.Tensor, int]:
    """(uint8 [N,3,size,size] on `device`, number of images that failed to decode and were replaced)."""
    decoded, bad = decode_all(jpegs, device)
    good = [i for i, im in enumerate(decoded) if im is not None]
    if not good:
        raise RuntimeError("no image of the batch could be decoded")
    out = torch.empty(len(decoded), 3, size, size, dtype=torch.uint8, device=device)
    for i, im in enumerate(decoded):
        k = i if im is not None else good[i % len(good)]
        im = decoded[k]
        x, y, w, h, flip, width, height = (int(t) for t in views[k])
        sx, sy = im.shape[-1] / width, im.shape[-2] / height
        v = resize_crop(im, int(round(y * sy)), int(round(x * sx)), max(1, int(round(h * sy))),
                        max(1, int(round(w * sx))), size)
        if flip:
            v = v.flip(-1)
        for op, sign in ops[k]:
            v = apply_op(v, op, sign)
        out[i].copy_(v)
    return out, bad


def finish_batch(batch: dict, device: torch.device, settings: Any) -> tuple[dict, int]:
    """Replace each part's (`_jpeg`, `_view`, `_ops`) by its decoded, augmented images on `device` (uint8, or
    normalised when `settings.normalize_in_loader`). Returns (batch, images that failed to decode)."""
    bad = 0
    for part in PARTS:
        if f"{part}_jpeg" not in batch:
            continue
        imgs, n = decode_views(batch.pop(f"{part}_jpeg"), batch.pop(f"{part}_view"), batch.pop(f"{part}_ops"),
                               settings.image_size, device)
        bad += n
        batch[part] = normalize(imgs, settings.mean, settings.std) if settings.normalize_in_loader else imgs
    return batch, bad
