"""Pretraining loader benchmark: end-to-end samples/s per worker vs the raw JPEG decode rate, same shards.

    python bench/loader.py                        # builds small COCO-sized shards in a temp dir (~1 min on CPU)
    python bench/loader.py --workers 14 --batches 200 --device cuda     # on a GPU machine (adds nvjpeg)
    python bench/loader.py --shards runs/demo/shards/coco               # existing shards instead

Measured in one run, one process per figure unless said otherwise:
- decode-only rate of every decoder on the stored JPEGs (full-size decode), and with DCT downscaling
  (Pillow `draft`, simplejpeg `min_width/min_height`) to the size a 224-px crop needs;
- with `--device cuda`: batched nvjpeg decode (`torchvision.io.decode_jpeg(list, device="cuda")`);
- the loader end to end (tar read, decode, augment, tokenise, MLM mask, collate, DataLoader transfer) with
  `--workers` processes, image-text part only and with the X-VLM region part;
- decode rates of the same images re-encoded with a longer side of 448 and 320 (the shards' `--max-side`).
`samples_per_s` counts image-text samples; region crops are extra decoded images, reported as images/s.
`fraction_of_decode` = end-to-end decoded images/s per worker / full-size decode-only images/s of the
loader's decoder (the issue's definition; the decode rate is the mean of one measurement before and one
after the loader runs). The loader may decode at 1/2, 1/4 or 1/8 scale when a crop
allows it, so `decode_at_loader_sizes` also times decode-only at the sizes the image-text crops ask for
(the same crop draws, the same DCT scales), and `fraction_of_decode_at_loader_sizes` divides by that.
The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("a an the man woman person dog cat horse car bus truck bike tree sign table chair pizza plate cup "
         "red blue green white black small large old young sitting standing riding holding next to on in near "
         "with of under left right top street beach room field water grass sky building window door").split()


def photo_like(rng: np.random.Generator, w: int, h: int):
    """A smooth, textured 'photo' (low-frequency colour field + shapes + grain): JPEG sizes like COCO's."""
    from PIL import Image, ImageDraw, ImageFilter

    base = rng.integers(0, 256, (h // 40 + 2, w // 40 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BICUBIC)
    d = ImageDraw.Draw(img)
    boxes = []
    for _ in range(int(rng.integers(3, 9))):
        bw, bh = int(rng.integers(30, w // 2)), int(rng.integers(30, h // 2))
        x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        d.ellipse([x, y, x + bw, y + bh], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        boxes.append([x, y, bw, bh])
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(1.0))).astype(np.int16)
    arr = np.clip(arr + rng.normal(0, 6, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr), boxes


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode = len(data), 0o444
    tf.addfile(ti, io.BytesIO(data))


def build_shards(out: Path, n: int, per_shard: int, size: tuple[int, int], seed: int = 0) -> tuple[Path, list[bytes]]:
    """COCO-like shards written as shards.build writes them (plain USTAR members, no pax headers)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    jpgs, shards, n_caps, n_regs = [], [], 0, 0
    for s in range(0, n, per_shard):
        name = f"shard-{s // per_shard:06d}.tar"
        with tarfile.open(out / name, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(s, min(n, s + per_shard)):
                img, boxes = photo_like(rng, *size)
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=90)
                jpgs.append(buf.getvalue())
                sent = lambda k: " ".join(rng.choice(WORDS, k))
                rec = {"schema": 1, "source": "coco", "image_id": str(i), "width": size[0], "height": size[1],
                       "orig_width": size[0], "orig_height": size[1],
                       "captions": [sent(int(rng.integers(8, 14))) for _ in range(5)],
                       "regions": [{"bbox": b, "text": sent(2), "kind": "object"} for b in boxes]}
                n_caps, n_regs = n_caps + 5, n_regs + len(boxes)
                _add(tf, f"coco-{i}.jpg", jpgs[-1])
                _add(tf, f"coco-{i}.json", json.dumps(rec).encode())
        shards.append({"name": name, "samples": min(n, s + per_shard) - s})
    (out / "manifest.json").write_text(json.dumps({"schema": 1, "source": "coco", "samples": n, "captions": n_caps,
                                                   "regions": n_regs, "shards": shards}))
    return out, jpgs


def read_jpegs(shard_dir: Path, limit: int) -> list[bytes]:
    from webdataset.tariterators import tarfile_samples

    from shards.stream import resolve_shards

    paths, _ = resolve_shards(str(shard_dir))
    out = []
    for s in tarfile_samples([{"url": p} for p in paths]):
        if "jpg" in s:
            out.append(s["jpg"])
        if len(out) >= limit:
            break
    return out


def rate(fn, items, min_s: float = 1.5) -> float:
    """Items/s of fn over `items`, repeated until `min_s` seconds passed (after one warm-up item)."""
    fn(items[0])
    n, t0 = 0, time.perf_counter()
    while True:
        for it in items:
            fn(it)
            n += 1
        if time.perf_counter() - t0 >= min_s:
            return n / (time.perf_counter() - t0)


def decoder_rates(jpgs: list[bytes], size: int, min_s: float) -> dict:
    import torch

    from shards.decode import decode_image

    torch.set_num_threads(1)
    from PIL import Image
    w, h = Image.open(io.BytesIO(jpgs[0])).size
    s = size / min(w, h)                              # the least reduction a full-image 224 crop needs
    need = (int(w * s), int(h * s))
    out = {}
    for name, dec, ms in (("pil", "pil", None), ("pil_draft", "pil", need), ("simplejpeg", "simplejpeg", None),
                          ("simplejpeg_reduce", "simplejpeg", need), ("torchvision", "torchvision", None)):
        try:
            out[name] = round(rate(lambda d: decode_image(d, dec, ms), jpgs, min_s), 1)
        except ImportError as e:
            out[name] = f"unavailable ({e})"
    return out


def loader_size_rate(jpgs: list[bytes], decoder: str, size: int, min_s: float, seed: int = 0) -> dict:
    """Decode-only images/s at the DCT scale the loader's image-text view picks for each image (crop drawn
    as the loader draws it), and the share of decodes that were downscaled."""
    import torch
    from PIL import Image

    from shards.augment import _min_decode_size, resized_crop_params
    from shards.decode import dct_scale, decode_image

    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    items = []
    for d in jpgs:
        w, h = Image.open(io.BytesIO(d)).size
        _, _, cw, ch = resized_crop_params(w, h, rng)
        items.append((d, _min_decode_size(w, h, cw, ch, size)))
    reduced = sum(dct_scale(*Image.open(io.BytesIO(d)).size, ms) > 1 for d, ms in items) / len(items)
    return {"images_per_s": round(rate(lambda it: decode_image(it[0], decoder, it[1]), items, min_s), 1),
            "downscaled_share": round(reduced, 3)}


def cuda_rate(jpgs: list[bytes], batch: int, min_s: float) -> float:
    import torch

    from shards.decode import decode_batch_cuda

    batches = [jpgs[i:i + batch] for i in range(0, len(jpgs) - batch + 1, batch)] or [jpgs]
    decode_batch_cuda(batches[0])
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_s:
        for b in batches:
            decode_batch_cuda(b)
            n += len(b)
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def reencode(jpgs: list[bytes], max_side: int) -> list[bytes]:
    from PIL import Image

    out = []
    for d in jpgs:
        im = Image.open(io.BytesIO(d))
        s = max_side / max(im.size)
        im = im.resize((round(im.size[0] * s), round(im.size[1] * s)), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def loader_rate(shard_dir: Path, tokenizer, *, workers: int, batches: int, batch_size: int, region: bool,
                decoder: str, image_size: int, uint8: bool = False) -> dict:
    from shards.stream import build_pretrain_loader

    cfg = dict(sources=[{"name": "coco", "shards": str(shard_dir), "weight": 1.0}], batch_size=batch_size,
               region_texts=128 if region else 0, region_images=48, texts_per_image=5, image_size=image_size,
               max_words=30, max_tokens=40, max_masks=8, mask_prob=0.25, num_workers=workers,
               shuffle_buffer=256, batches_per_epoch=batches + max(1, workers), decoder=decoder,
               normalize_in_loader=not uint8)
    loader = build_pretrain_loader(cfg, tokenizer, rank=0, world_size=1, epoch=0, seed=0, record_keys=True)
    it = iter(loader)
    for _ in range(max(1, workers)):                   # warm-up: worker start and one batch each
        next(it)
    n_img = n_reg = 0
    t0 = time.perf_counter()
    for b in it:
        n_img += b["image"].shape[0]
        n_reg += len(loader.keys[-1]) - batch_size if region else 0
    dt = time.perf_counter() - t0
    return {"samples_per_s": n_img / dt, "images_per_s": (n_img + n_reg) / dt, "region_images_per_batch":
            n_reg / max(1, batches), "seconds": dt}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", help="existing pretraining shard dir (default: build COCO-sized ones in a temp dir)")
    p.add_argument("--images", type=int, default=192, help="images to build (default 192)")
    p.add_argument("--max-side", type=int, default=640, help="longer side of the built images (4:3; default 640)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader worker processes (default 1)")
    p.add_argument("--batches", type=int, default=12, help="timed batches per loader run (default 12)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--decoder", default=None, choices=["pil", "simplejpeg", "torchvision"],
                   help="the loader's decoder (default: simplejpeg when installed, else pil)")
    p.add_argument("--uint8", action="store_true",
                   help="workers send uint8 batches (data.normalize_in_loader=false; the step normalises on its GPU)")
    p.add_argument("--device", default="cpu", help="cuda adds the batched nvjpeg decode rate")
    p.add_argument("--decode-seconds", type=float, default=1.5, help="time per decode-rate figure")
    p.add_argument("--tokenizer", help="BERT tokenizer dir (default: all-MiniLM-L6-v2's bert-base-uncased vocab, "
                                       "else a vocab built here)")
    a = p.parse_args(argv)
    try:
        import simplejpeg  # noqa: F401
        have_simplejpeg = True
    except ImportError:
        have_simplejpeg = False
    if a.decoder is None:
        a.decoder = "simplejpeg" if have_simplejpeg else "pil"
    elif a.decoder == "simplejpeg" and not have_simplejpeg:
        print("error: --decoder simplejpeg but simplejpeg is not installed (pip install simplejpeg)", file=sys.stderr)
        return 2
    if a.shards and not Path(a.shards).is_dir():
        print(f"error: {a.shards}: shard directory not found", file=sys.stderr)
        return 2
    import torch

    from shards.decode import decode_image
    from shards.text import build_tokenizer, build_vocab_tokenizer, default_tokenizer_dir

    tmp = tempfile.TemporaryDirectory()
    if a.shards:
        shard_dir, jpgs = Path(a.shards), read_jpegs(Path(a.shards), 200)
    else:
        t = time.perf_counter()
        wh = (a.max_side, round(a.max_side * 3 / 4))
        shard_dir, jpgs = build_shards(Path(tmp.name) / "coco", a.images, 48, wh)
        print(f"built {a.images} {wh[0]}x{wh[1]} JPEGs (mean {np.mean([len(j) for j in jpgs]) / 1024:.0f} KB) "
              f"in {time.perf_counter() - t:.1f}s")
    if a.tokenizer:
        tok = build_tokenizer(a.tokenizer)
    else:
        bert_dir = default_tokenizer_dir()
        tok = build_tokenizer(bert_dir) if bert_dir else build_vocab_tokenizer(WORDS, Path(tmp.name) / "tok")
    # every JPEG of the shards in turn (not a few cached ones: decoding the same 64 images in a loop ran
    # 1.5-1.8x faster here than decoding fresh ones, which would flatter the baseline)
    sample = jpgs
    dec = decoder_rates(sample, a.image_size, a.decode_seconds)
    print("decode-only images/s, one process:", dec)
    at_sizes = loader_size_rate(sample, a.decoder, a.image_size, a.decode_seconds)
    print(f"decode-only at the loader's decode sizes ({a.decoder}): {at_sizes['images_per_s']} images/s "
          f"({100 * at_sizes['downscaled_share']:.0f}% of decodes DCT-downscaled)")
    sizes = {}
    for side in (448, 320):
        small = reencode(sample[:96], side)
        sizes[side] = {"kb": round(float(np.mean([len(j) for j in small])) / 1024, 1),
                       **{k: v for k, v in decoder_rates(small, a.image_size, a.decode_seconds / 2).items()
                          if k in ("pil", "simplejpeg")}}
    sizes["stored"] = {"kb": round(float(np.mean([len(j) for j in sample])) / 1024, 1), "pil": dec["pil"],
                       "simplejpeg": dec["simplejpeg"]}
    print("decode-only images/s by stored longer side:", sizes)
    gpu = None
    if a.device.startswith("cuda"):
        if not torch.cuda.is_available():
            print("error: --device cuda but no CUDA device", file=sys.stderr)
            return 2
        gpu = round(cuda_rate(jpgs, 64, a.decode_seconds), 1)
        print(f"nvjpeg batched decode (64/batch): {gpu} images/s")
    runs = {}
    for region in (False, True):
        r = loader_rate(shard_dir, tok, workers=a.workers, batches=a.batches, batch_size=a.batch_size, region=region,
                        decoder=a.decoder, image_size=a.image_size, uint8=a.uint8)
        runs["with_regions" if region else "image_text_only"] = r
        print(f"loader ({'image-text + regions' if region else 'image-text only'}, {a.workers} workers): "
              f"{r['samples_per_s']:.1f} samples/s, {r['images_per_s']:.1f} images/s")
    # decode-only again after the loader runs: on a shared machine the rate drifts by 10-30 % within a
    # minute, so the fractions divide by the mean of the rates measured before and after
    again = round(rate(lambda d: decode_image(d, a.decoder), sample, a.decode_seconds), 1)
    again_sizes = loader_size_rate(sample, a.decoder, a.image_size, a.decode_seconds)["images_per_s"]
    print(f"decode-only again after the loader runs: {again} images/s full size, {again_sizes} at the loader's sizes")
    base = round((dec[a.decoder] + again) / 2, 1)
    base_sizes = round((at_sizes["images_per_s"] + again_sizes) / 2, 1)
    workers = max(1, a.workers)
    itx, full = runs["image_text_only"], runs["with_regions"]
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus" + (f", {torch.cuda.get_device_name()}" if gpu else ""),
        "workers": a.workers, "decoder": a.decoder, "uint8_batches": a.uint8, "stored_max_side": a.max_side if not a.shards else None, "image_size": a.image_size, "batch_size": a.batch_size,
        "samples_per_s": round(full["samples_per_s"], 1),
        "samples_per_s_per_worker": round(full["samples_per_s"] / workers, 1),
        "images_per_s_per_worker": round(full["images_per_s"] / workers, 1),
        "image_text_only_samples_per_s": round(itx["samples_per_s"], 1),
        "decode_only_samples_per_s": base,
        "decode_only_before_after": [dec[a.decoder], again],
        "fraction_of_decode": round(full["images_per_s"] / workers / base, 3),
        "fraction_of_decode_image_text_only": round(itx["images_per_s"] / workers / base, 3),
        "decode_at_loader_sizes_samples_per_s": base_sizes,
        "decode_at_loader_sizes_downscaled_share": at_sizes["downscaled_share"],
        "fraction_of_decode_at_loader_sizes": round(full["images_per_s"] / workers / base_sizes, 3),
        "fraction_of_decode_at_loader_sizes_image_text_only": round(itx["images_per_s"] / workers / base_sizes, 3),
        "region_images_per_batch": round(full["region_images_per_batch"], 1),
        "decoders": dec, "stored_side": sizes, "nvjpeg_images_per_s": gpu,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
