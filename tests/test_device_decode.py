"""data.decode_on=gpu on the CPU (the same code path with device="cpu"): workers ship JPEG bytes and view
parameters, the main process decodes and augments; the batches equal the CPU path's within resampling
tolerance, and each RandomAugment op matches Pillow's."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from loader_shards import data_cfg, pretrain_record, write_shards
from shards.augment import GEOMETRIC_OPS, PHOTOMETRIC_OPS, _pil_op
from shards.device_decode import apply_op, pil_affine
from shards.stream import build_pretrain_loader


def textured(w: int, h: int, seed: int) -> np.ndarray:
    """A smooth colour field with sharp-edged blocks: resampling differences show, and so do wrong geometry."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8)).resize((w, h),
                                                                                                     Image.BICUBIC)
    arr = np.array(base)
    for _ in range(4):
        x, y = int(rng.integers(0, w - 12)), int(rng.integers(0, h - 12))
        arr[y:y + 12, x:x + 12] = rng.integers(0, 256, 3)
    return arr


def textured_record(source, i, rng, **kw):
    rec, _ = pretrain_record(source, i, rng, size=(96, 72))
    buf = io.BytesIO()
    Image.fromarray(textured(96, 72, i)).save(buf, "JPEG", quality=92)
    return rec, buf.getvalue()


def batches(tmp_path, tok, decode_on: str, **kw):
    cfg = data_cfg([{"name": "coco", "shards": str(tmp_path / "coco")}], image_size=48, batches_per_epoch=3,
                   normalize_in_loader=False, decode_on=decode_on, max_tokens=16, **kw)
    return list(build_pretrain_loader(cfg, tok, rank=0, world_size=1, epoch=0, seed=3,
                                      device=torch.device("cpu")))


@pytest.mark.parametrize("reduce,mean_tol", [(False, 1.5), (True, 6.0)])
def test_gpu_decode_path_gives_the_cpu_paths_batches(tmp_path, tok, reduce, mean_tol):
    write_shards(tmp_path / "coco", "coco", 2, 12, record=textured_record)
    cpu = batches(tmp_path, tok, "cpu", decode_reduce=reduce)
    dev = batches(tmp_path, tok, "gpu", decode_reduce=reduce, num_workers=1)
    assert len(cpu) == len(dev) == 3
    for a, b in zip(cpu, dev):
        assert a.keys() == b.keys()
        for k in a:
            if k in ("image", "region_image"):
                assert a[k].shape == b[k].shape and b[k].dtype == torch.uint8
                diff = (a[k].float() - b[k].float()).abs()
                assert float(diff.mean()) < mean_tol, (k, float(diff.mean()))
                if not reduce:
                    assert float((diff > 24).float().mean()) < 0.01, (k, float((diff > 24).float().mean()))
            elif k == "region_bbox" and reduce:     # boxes of a downscaled decode round a little differently
                torch.testing.assert_close(a[k], b[k], atol=0.05, rtol=0)
            else:
                torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_a_wrong_view_would_be_seen(tmp_path, tok):
    """The tolerance above is tight enough to catch a view without its flip (the check can fail)."""
    write_shards(tmp_path / "coco", "coco", 2, 12, record=textured_record)
    cpu = batches(tmp_path, tok, "cpu", decode_reduce=False)
    assert float((cpu[0]["image"].float() - cpu[0]["image"].flip(-1).float()).abs().mean()) > 6.0


@pytest.mark.parametrize("op", [o for o in PHOTOMETRIC_OPS + GEOMETRIC_OPS if o != "identity"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_each_op_matches_pillow(op, sign):
    arr = textured(56, 40, 7)
    ref = np.array(_pil_op(Image.fromarray(arr), op, 0.7, sign))
    out = apply_op(torch.from_numpy(arr).permute(2, 0, 1).contiguous(), op, sign).permute(1, 2, 0).numpy()
    diff = np.abs(ref.astype(int) - out.astype(int))
    if op in GEOMETRIC_OPS:             # the same source pixel for (almost) every output pixel
        assert (diff > 0).mean() < 0.01, (op, (diff > 0).mean())
    else:                               # rounding of blends and lookup tables
        assert diff.max() <= 2, (op, diff.max())


def test_pil_affine_is_pillows_transform():
    arr = textured(30, 20, 1)
    for m in [(1, 0.21, 0, 0, 1, 0), (1, 0, -7, 0, 1, 0), (0.94, 0.34, -2.1, -0.34, 0.94, 6.3)]:
        ref = np.array(Image.fromarray(arr).transform((30, 20), Image.AFFINE, m, fillcolor=(128, 128, 128)))
        out = pil_affine(torch.from_numpy(arr).permute(2, 0, 1), m).permute(1, 2, 0).numpy()
        assert (ref != out).any(axis=-1).mean() <= 0.02, m     # float rounding at pixel boundaries
