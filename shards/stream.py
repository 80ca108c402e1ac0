"""Streaming pretraining loader: a weighted multi-source, multi-grained mix over WebDataset shards.

    loader = build_pretrain_loader(cfg.data, tokenizer, rank=r, world_size=w, epoch=e, seed=s, start_batch=k)
    for batch in loader: ...          # exactly cfg.data.batches_per_epoch - k batches, dict of tensors

How one epoch is read (per rank, per DataLoader worker, all inside the worker processes):
1. Shards: each source's shard list is shuffled with a seed of (seed, epoch, source, pass) -- the same on
   every rank -- then split by node and then by worker: consumer `rank * num_workers + worker` takes every
   `world_size * num_workers`-th shard. A source with fewer shards than consumers is read by every consumer,
   which keeps every n-th sample instead, so consumers stay disjoint either way. When a consumer's share is
   used up, the next pass starts with a new shuffle (the stream is endless; the epoch is a fixed batch count).
2. Mix: the image-text part picks a source per sample with probability proportional to its weight among
   the sources with captions; the region part does the same among the sources with regions. Each part has
   its own shard reader and a shuffle buffer of `shuffle_buffer` raw (undecoded) samples.
3. Plan: everything random that decides *which* samples form a batch (mixing, shuffling, caption choice,
   region crop and kept boxes) is drawn from the JSON alone, before decoding. Decoding, augmentation,
   tokenisation and masking use a generator seeded by (seed, epoch, rank, world_size, worker, batch).
   Resuming at `start_batch` therefore replays the plan of the skipped batches (tar reading and JSON only,
   no JPEG decoding) and yields exactly the batches an uninterrupted run would have yielded.
4. Batches: `batch_size` image-text items, and `region_texts` region texts drawn from at most
   `region_images` region crops (up to `texts_per_image` per image); texts are repeated to fill the fixed
   count (`region_repeats`), images repeated to fill `region_images`.
With `decode_on="gpu"` the workers stop before the pixels: they draw the same view parameters and ship the
JPEG bytes with them, and the loader's main-process side decodes and augments each batch on the training
device (`shards.device_decode`).
Shard lists, splits, raw reading and mixing live in `shards.sources`; this module plans, decodes and batches.
Bad samples (unreadable or truncated tar, bad JSON, undecodable image, no usable caption/box) are skipped
and counted by reason, never raised; a summary is logged at the end of each worker's epoch and the loader's
`skips` holds the totals seen so far. An image that fails to decode inside a batch is replaced by another
image of the same batch (counted as `bad_image`), so a resumed run stays identical.

`data_time`: the training loop times `next(iterator)` around each batch; `PretrainLoader.wait_s` adds up
that time too, for a loop that only wants an epoch total.
"""
from __future__ import annotations

import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import shuffle

from shards.augment import (CLIP_MEAN, CLIP_STD, RegionPlan, ViewParams, image_text_params, image_text_view,
                            normalize_batch, plan_region_crop, region_geometry, region_params, region_view,
                            stack_uint8)
from shards.decode import DECODERS, DecodeError
from shards.device_decode import finish_batch, jpeg_tensor, view_row
from shards.imagecheck import HeaderProblem, open_checked
from shards.determinism import loader_generator
from shards.sources import (DataError, Raw, SkipCounter, Source, endless_source, get_field, mix_sources,
                            parse_sources, resolve_shards)
from shards.text import MLMMasker, clean_caption, encode_and_mask, swap_left_right

__all__ = ["DataError", "PretrainLoader", "PretrainStream", "StreamSettings", "build_pretrain_loader",
           "parse_sources", "resolve_shards"]
log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Batch plans (decided without decoding) and their materialisation
# ----------------------------------------------------------------------------------------------
@dataclass
class ImageItem:
    raw: Raw
    caption: str


@dataclass
class RegionItem:
    raw: Raw
    plan: RegionPlan


@dataclass
class BatchPlan:
    images: list[ImageItem]
    regions: list[RegionItem] = field(default_factory=list)


@dataclass
class StreamSettings:
    """The loader's settings, read from a `PretrainDataConfig`-like object (see `from_config`)."""
    batch_size: int = 64
    region_texts: int = 128
    region_images: int = 48
    texts_per_image: int = 5
    image_size: int = 224
    max_words: int = 30
    max_tokens: Optional[int] = None          # token length L incl. [CLS]/[SEP]; default max_words + 2
    max_masks: int = 8
    mask_prob: float = 0.25
    num_workers: int = 4
    shuffle_buffer: int = 2000
    batches_per_epoch: int = 1000
    decoder: str = "pil"
    decode_reduce: bool = True                # DCT-downscaled decoding when the crop allows it
    crop_scale: tuple = (0.2, 1.0)            # image-text view: random resized crop's area fraction (X-VLM)
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    normalize_in_loader: bool = True          # False: uint8 images, the training step normalises (on its GPU)
    decode_on: str = "cpu"                    # gpu: ship JPEG bytes + view parameters (shards.device_decode)

    @classmethod
    def from_config(cls, cfg: Any) -> "StreamSettings":
        kw = {f: get_field(cfg, f) for f in cls.__dataclass_fields__ if get_field(cfg, f) is not None}
        s = cls(**kw)
        cs = s.crop_scale
        if (not isinstance(cs, (list, tuple)) or len(cs) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in cs)
                or not 0.0 < cs[0] <= cs[1] <= 1.0):
            raise DataError(f"data.crop_scale: expected [min, max] with 0 < min <= max <= 1, got {cs!r:.60}")
        s.mean, s.std, s.crop_scale = tuple(s.mean), tuple(s.std), tuple(cs)
        if s.decode_on not in ("cpu", "gpu"):
            raise DataError(f"data.decode_on: expected cpu or gpu, got {s.decode_on!r}")
        if s.decoder not in DECODERS:
            raise DataError(f"data.decoder: expected one of {', '.join(DECODERS)}, got {s.decoder!r}")
        if s.decoder == "simplejpeg":
            try:
                import simplejpeg  # noqa: F401
            except ImportError:
                raise DataError("data.decoder=simplejpeg but simplejpeg is not installed "
                                "(pip install simplejpeg, or set data.decoder=pil)") from None
        for k in ("batch_size", "batches_per_epoch", "image_size", "max_words", "texts_per_image"):
            if getattr(s, k) < 1:
                raise DataError(f"data.{k}: must be >= 1, got {getattr(s, k)}")
        if s.region_texts < 0 or (s.region_texts > 0 and s.region_images < 1):
            raise DataError("data.region_texts must be >= 0 and data.region_images >= 1 when region_texts > 0")
        if len(s.mean) != 3 or len(s.std) != 3:
            raise DataError("data.mean and data.std need three numbers")
        return s

    @property
    def text_len(self) -> int:
        return int(self.max_tokens) if self.max_tokens else self.max_words + 2


class PretrainStream(IterableDataset):
    """The per-worker pipeline (iterable of batches); use `build_pretrain_loader` to run it."""

    def __init__(self, sources: list[Source], tokenizer: Any, settings: StreamSettings, *, rank: int,
                 world_size: int, epoch: int, seed: int, start_batch: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.sources, self.tok, self.s = sources, tokenizer, settings
        self.rank, self.world, self.epoch, self.seed = rank, world_size, epoch, seed
        self.start_batch, self.num_workers = start_batch, max(1, num_workers)
        self.masker = MLMMasker(tokenizer, mask_prob=settings.mask_prob, max_masks=settings.max_masks)
        self.skips = SkipCounter()

    # -- which batches this worker produces --------------------------------------------------
    def _virtual_worker(self) -> int:
        """DataLoader hands batch k to worker k % W; rotating identities by start_batch keeps global batch b
        on virtual worker b % W whether or not the run was resumed."""
        info = get_worker_info()
        w = info.id if info is not None else 0
        return (w + self.start_batch) % self.num_workers

    def _quota(self, v: int) -> tuple[int, int]:
        """(batches to skip, batches to yield) for virtual worker v."""
        W, total = self.num_workers, self.s.batches_per_epoch
        mine = len(range(v, total, W))
        skip = len(range(v, min(self.start_batch, total), W))
        return skip, mine - skip

    def _seed(self, v: int, *extra: int) -> list[int]:
        return [self.seed, self.epoch, self.rank, self.world, self.num_workers, v, *extra]

    # -- plans ------------------------------------------------------------------------------
    def plans(self, v: int) -> Iterator[BatchPlan]:
        """Endless batch plans for virtual worker v (decode-free; deterministic)."""
        s = self.s
        consumer, n_cons = self.rank * self.num_workers + v, self.world * self.num_workers
        rng = np.random.default_rng(self._seed(v, 0))
        py_rng = random.Random(int(rng.integers(2**63)))

        def part_stream(part: str) -> Optional[Iterator[Raw]]:
            idx = [i for i, src in enumerate(self.sources) if part in src.parts]
            if not idx:
                return None
            streams = [endless_source(self.sources[i], i, part, seed=self.seed, epoch=self.epoch, consumer=consumer,
                                n_consumers=n_cons, skips=self.skips) for i in idx]
            mixed = mix_sources(streams, [self.sources[i].weight for i in idx], rng)
            buffer = shuffle(max(1, s.shuffle_buffer), max(1, s.shuffle_buffer // 2), rng=py_rng)
            return buffer(mixed)

        images = part_stream("image")
        if images is None:
            raise DataError("no data source provides captions (image-text part)")
        regions = part_stream("region") if s.region_texts > 0 else None
        if s.region_texts > 0 and regions is None:
            raise DataError("no data source provides regions; set data.region_texts=0 to train without them")
        while True:
            plan = BatchPlan(images=[])
            while len(plan.images) < s.batch_size:
                raw = _next(images, "image-text")
                caps = [c for c in (clean_caption(c, s.max_words) for c in raw.meta.get("captions") or []
                                    if isinstance(c, str)) if c]
                if not caps:
                    self.skips.add("no_caption", raw.key)
                    continue
                plan.images.append(ImageItem(raw, caps[int(rng.integers(0, len(caps)))]))
            n_texts = 0
            while regions is not None and n_texts < s.region_texts and len(plan.regions) < s.region_images:
                raw = _next(regions, "region")
                regs = []
                for r in raw.meta.get("regions") or []:
                    t = clean_caption(r.get("text", ""), s.max_words) if isinstance(r, dict) else ""
                    b = r.get("bbox") if isinstance(r, dict) else None
                    if t and _finite_box(b):
                        regs.append((tuple(float(x) for x in b), t))
                rp = plan_region_crop(int(raw.meta["width"]), int(raw.meta["height"]), regs, rng,
                                      max_texts=min(s.texts_per_image, s.region_texts - n_texts))
                if rp is None or not rp.texts:
                    self.skips.add("no_valid_region", raw.key)
                    continue
                plan.regions.append(RegionItem(raw, rp))
                n_texts += len(rp.texts)
            yield plan

    # -- materialisation --------------------------------------------------------------------
    def build_batch(self, plan: BatchPlan, rng: np.random.Generator) -> dict:
        s = self.s
        imgs, captions, ok = [], [], []
        for it in plan.images:
            try:
                img, flipped = self._image_view(it.raw, rng)
                imgs.append(img)
                captions.append(swap_left_right(it.caption) if flipped else it.caption)
                ok.append(True)
            except DecodeError as e:
                self.skips.add("bad_image", f"{it.raw.key}: {e}")
                imgs.append(None)
                captions.append(it.caption)
                ok.append(False)
        imgs, captions = _fill_failed(imgs, captions, ok)
        text = encode_and_mask(self.tok, self.masker, captions, s.text_len, rng)
        batch = {**self._pack("image", imgs),
                 "text_ids": text["ids"], "text_mask": text["mask"],
                 "mlm_ids": text["mlm_ids"], "mlm_labels": text["mlm_labels"]}
        if s.region_texts > 0:
            batch.update(self._region_batch(plan.regions, rng))
        return batch

    def _image_view(self, raw: Raw, rng: np.random.Generator) -> tuple[Any, bool]:
        """(uint8 view, flipped); with decode_on=gpu the view is (JPEG bytes, view row, ops), undecoded."""
        s, w, h = self.s, int(raw.meta["width"]), int(raw.meta["height"])
        if s.decode_on == "gpu":
            params = image_text_params(w, h, rng, scale=s.crop_scale)
            return _deferred(raw.jpg, params, w, h), params.flip
        return image_text_view(raw.jpg, w, h, rng, size=s.image_size, decoder=s.decoder, reduce=s.decode_reduce,
                               scale=s.crop_scale)

    def _region_view(self, raw: Raw, plan: RegionPlan, rng: np.random.Generator) -> tuple[Any, torch.Tensor]:
        """(uint8 crop, boxes); with decode_on=gpu the crop is (JPEG bytes, view row, ops) and the boxes are
        those of a full-size decode."""
        s, w, h = self.s, int(raw.meta["width"]), int(raw.meta["height"])
        if s.decode_on == "gpu":
            params = region_params(plan, rng)
            return _deferred(raw.jpg, params, w, h), region_geometry(plan, w, h, h, w, s.image_size)[1]
        return region_view(raw.jpg, w, h, plan, rng, size=s.image_size, decoder=s.decoder, reduce=s.decode_reduce)

    def _pack(self, part: str, imgs: list) -> dict:
        """The batch entries of one image part: `part` -> [B,3,S,S], or with decode_on=gpu the `_jpeg`,
        `_view` and `_ops` entries shards.device_decode.finish_batch turns into it."""
        s, shared = self.s, get_worker_info() is not None
        if s.decode_on == "gpu":
            return {f"{part}_jpeg": [i[0] for i in imgs], f"{part}_view": torch.tensor([i[1] for i in imgs]),
                    f"{part}_ops": [i[2] for i in imgs]}
        if s.normalize_in_loader:
            return {part: normalize_batch(imgs, s.mean, s.std, shared=shared)}
        return {part: stack_uint8(imgs, shared=shared)}

    def _region_batch(self, items: list[RegionItem], rng: np.random.Generator) -> dict:
        s = self.s
        crops, texts, boxes, owner, ok = [], [], [], [], []
        for j, it in enumerate(items):
            try:
                img, bx = self._region_view(it.raw, it.plan, rng)
                crops.append(img)
                ok.append(True)
                texts += it.plan.texts
                boxes.append(bx)
                owner += [j] * len(it.plan.texts)
            except DecodeError as e:
                self.skips.add("bad_image", f"{it.raw.key}: {e}")
                crops.append(None)
                ok.append(False)
        if not any(ok):
            raise _AllFailed()
        good = [j for j in range(len(items)) if ok[j]]
        crops = [c if c is not None else crops[good[j % len(good)]] for j, c in enumerate(crops)]
        boxes_t = torch.cat(boxes)
        n_real = len(texts)
        R = s.region_texts
        fill = [k % n_real for k in range(R)]            # repeat texts cyclically to reach R
        texts = [texts[k] for k in fill]
        boxes_t, owner_t = boxes_t[fill], torch.tensor([owner[k] for k in fill], dtype=torch.long)
        M = s.region_images
        crops = [crops[j % len(crops)] for j in range(M)]  # repeat images to reach M
        text = encode_and_mask(self.tok, self.masker, texts, s.text_len, rng)
        return {**self._pack("region_image", crops),
                "region_image_idx": owner_t, "region_bbox": boxes_t.float(),
                "region_text_ids": text["ids"], "region_text_mask": text["mask"],
                "region_mlm_ids": text["mlm_ids"], "region_mlm_labels": text["mlm_labels"],
                "region_repeats": torch.tensor(max(0, R - n_real), dtype=torch.long)}

    def __iter__(self) -> Iterator[dict]:
        v = self._virtual_worker()
        skip, todo = self._quota(v)
        plans = self.plans(v)
        for _ in range(skip):
            next(plans)
        W = self.num_workers
        first_local = skip
        for j in range(todo):
            local = first_local + j
            b = local * W + v                          # global batch index within the epoch
            plan = next(plans)
            rng = np.random.default_rng(self._seed(v, 1, b))
            while True:
                try:
                    batch = self.build_batch(plan, rng)
                    break
                except _AllFailed:                     # every image of the plan undecodable: take the next plan
                    plan = next(plans)
            batch["_meta"] = {"worker": v, "batch": b, "skips": dict(self.skips.counts),
                              "keys": [it.raw.key for it in plan.images] + [it.raw.key for it in plan.regions]}
            yield batch
        if self.skips.counts:
            log.warning("rank %d worker %d epoch %d: skipped %s", self.rank, v, self.epoch, dict(self.skips.counts))


class _AllFailed(Exception):
    pass


def _deferred(data: bytes, params: ViewParams, width: int, height: int) -> tuple:
    """An image for the device decode: (bytes tensor, view row, ops) after the header checks the CPU decoder
    makes first (a bad header is a DecodeError here, as there)."""
    try:
        open_checked(data)
    except HeaderProblem as e:
        raise DecodeError(str(e)) from None
    return jpeg_tensor(data), view_row(params, width, height), params.ops


def _finite_box(b: Any) -> bool:
    return (isinstance(b, (list, tuple)) and len(b) == 4
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) for x in b))


def _next(it: Iterator[Raw], what: str) -> Raw:
    try:
        return next(it)
    except StopIteration:
        raise DataError(f"no readable {what} samples left in any source (all shards empty or unreadable?)") from None


def _fill_failed(imgs: list, captions: list, ok: list) -> tuple[list, list]:
    good = [i for i, g in enumerate(ok) if g]
    if not good:
        raise _AllFailed()
    for i, g in enumerate(ok):
        if not g:
            k = good[i % len(good)]
            imgs[i], captions[i] = imgs[k], captions[k]
    return imgs, captions


# ----------------------------------------------------------------------------------------------
# The loader
# ----------------------------------------------------------------------------------------------
class PretrainLoader:
    """Iterable over one epoch's batches for one rank; a torch DataLoader (batch_size=None) over
    `PretrainStream`. `skips` sums the skip counts reported by the workers; `keys` (when
    `record_keys`) lists the sample keys of every batch, for tests and debugging."""

    def __init__(self, stream: PretrainStream, *, num_workers: int, record_keys: bool = False,
                 pin_memory: bool = False, device: torch.device | None = None) -> None:
        self.stream, self.record_keys = stream, record_keys
        self.device = device                    # where decode_on=gpu decodes (default: the current CUDA device)
        self._device_bad = 0
        self.loader = DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                 persistent_workers=False, prefetch_factor=2 if num_workers > 0 else None,
                                 generator=loader_generator(stream.seed, stream.epoch, stream.rank))
        self.skips: Counter = Counter()
        self.keys: list[list[str]] = []
        self.wait_s = 0.0
        self._per_worker: dict[int, dict] = {}

    def _decode_device(self) -> torch.device:
        if self.device is None:
            self.device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                           else torch.device("cpu"))
        return self.device

    def __len__(self) -> int:
        s = self.stream.s
        return max(0, s.batches_per_epoch - self.stream.start_batch)

    def __iter__(self) -> Iterator[dict]:
        it = iter(self.loader)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            meta = batch.pop("_meta")
            if self.stream.s.decode_on == "gpu":
                batch, bad = finish_batch(batch, self._decode_device(), self.stream.s)
                self._device_bad += bad
            self.wait_s += time.perf_counter() - t
            self._per_worker[int(meta["worker"])] = meta["skips"]
            self.skips = sum((Counter(c) for c in self._per_worker.values()), Counter())
            if self._device_bad:
                self.skips["bad_image"] += self._device_bad
            if self.record_keys:
                self.keys.append(list(meta["keys"]))
            yield batch
        if self.skips:
            log.warning("epoch %d rank %d: skipped samples %s", self.stream.epoch, self.stream.rank, dict(self.skips))


def build_pretrain_loader(data_cfg: Any, tokenizer: Any, *, rank: int, world_size: int, epoch: int, seed: int,
                          start_batch: int = 0, record_keys: bool = False,
                          device: torch.device | None = None) -> PretrainLoader:
    """One rank's loader for one epoch: exactly `data_cfg.batches_per_epoch - start_batch` batches,
    deterministic for (seed, epoch, rank, world_size, data_cfg.num_workers).

    `data_cfg` is a `PretrainDataConfig` or any object/mapping with its field names: sources (list of
    {name, shards, weight[, parts]}), batch_size, region_texts, region_images, texts_per_image, image_size,
    max_words, max_tokens, max_masks, mask_prob, num_workers, shuffle_buffer, batches_per_epoch, decoder,
    decode_reduce, mean, std, normalize_in_loader, decode_on (gpu: decoded on `device`, default the current CUDA
    device, else the CPU). Raises `DataError` (one line) for a bad path or setting."""
    settings = StreamSettings.from_config(data_cfg)
    sources = parse_sources(get_field(data_cfg, "sources"))
    if not 0 <= start_batch <= settings.batches_per_epoch:
        raise DataError(f"start_batch {start_batch} outside [0, {settings.batches_per_epoch}]")
    stream = PretrainStream(sources, tokenizer, settings, rank=rank, world_size=world_size, epoch=epoch, seed=seed,
                            start_batch=start_batch, num_workers=settings.num_workers)
    return PretrainLoader(stream, num_workers=settings.num_workers, record_keys=record_keys,
                          pin_memory=torch.cuda.is_available(), device=device)
