"""Map-style grounding data over the same WebDataset shards: one item per (ref, sentence), exact eval.

    ds = GroundingDataset("runs/demo/shards/refcoco/val", tokenizer, train=False)
    loader = build_grounding_loader("…/val", tokenizer, train=False, batch_size=32, num_workers=4,
                                    rank=r, world_size=w, epoch=0, seed=0)
    ds.target(i)   # ground truth of item i in stored-image pixels, for the evaluator

Random access uses `TarIndex`, an index of member offsets built by scanning the tar headers once (no
extraction), so items are read with one seek each. The JSON of every image is parsed at start-up to
enumerate the expressions; images and masks are decoded in the workers.

Evaluation is exact: `ExactDistributedSampler` gives rank r the indices r, r + W, r + 2W, … with no padding,
so every expression is visited exactly once over all ranks (ranks may differ by one item; gather results by
`index` and never run collectives per batch in evaluation). Training uses torch's `DistributedSampler`
(shuffled per epoch, padded so that ranks take equal steps).
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from shards.augment import CLIP_MEAN, CLIP_STD, grounding_view, normalize
from shards.context import choose_context, kept_in_view
from shards.decode import DecodeError, decode_image
from shards.determinism import loader_generator
from shards.masks import decode_mask
from shards.schema import is_generalised_ref
from shards.sources import DataError, resolve_shards
from shards.text import clean_caption, has_direction_words, swap_left_right

log = logging.getLogger(__name__)


class TarIndex:
    """Offsets of every member of a list of uncompressed tars, grouped into samples by key (WebDataset
    convention: `<key>.<ext>`). `read(i, ext)` returns the bytes of sample i's member with one seek."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = list(paths)
        self.keys: list[str] = []
        self.members: list[dict[str, tuple[int, int]]] = []       # ext -> (shard, offset, size)
        self.problems: Counter = Counter()
        for si, p in enumerate(self.paths):
            by_key: dict[str, dict] = {}
            order: list[str] = []
            try:
                with tarfile.open(p, "r:") as tf:
                    for m in tf:
                        if not m.isreg() or "." not in os.path.basename(m.name):
                            continue
                        head, _, name = m.name.rpartition("/")
                        stem, ext = name.split(".", 1)          # WebDataset: key = path up to the first dot
                        key = f"{head}/{stem}" if head else stem
                        if key not in by_key:
                            by_key[key] = {}
                            order.append(key)
                        by_key[key][ext.lower()] = (si, m.offset_data, m.size)
            except (tarfile.TarError, OSError, EOFError) as e:
                self.problems["bad_tar"] += 1
                log.warning("%s: unreadable tail of shard (%s); indexed %d samples before it", p, e, len(order))
            for key in order:
                self.keys.append(key)
                self.members.append(by_key[key])
        self._files: dict[int, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, i: int, ext: str) -> bytes:
        if os.getpid() != self._pid:                 # never share file offsets with a forked worker
            self._files, self._pid = {}, os.getpid()
        si, off, size = self.members[i][ext]
        f = self._files.get(si)
        if f is None:
            f = self._files[si] = open(self.paths[si], "rb")
        f.seek(off)
        data = f.read(size)
        if len(data) != size:
            raise DecodeError(f"{self.paths[si]}: member {self.keys[i]}.{ext} is truncated")
        return data

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_files"] = {}
        return d


_IMAGE_EXTS = ("jpg", "jpeg", "png")


def _box_ok(b: Any) -> bool:
    if not isinstance(b, list) or len(b) != 4:
        return False
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in b):
        return False
    return b[2] > 0 and b[3] > 0


def _usable_ref(r: Any) -> bool:
    """A stored ref the dataset can train and score on: an integer id, a finite positive box (a generalised ref:
    one per ann id, none exactly when no_target), a sentence list."""
    if not isinstance(r, dict) or not isinstance(r.get("sentences"), list):
        return False
    rid = r.get("ref_id", -1)
    if not isinstance(rid, int) or isinstance(rid, bool):
        return False
    if is_generalised_ref(r):
        ids, boxes = r.get("ann_ids"), r.get("bboxes")
        return (isinstance(ids, list) and isinstance(boxes, list) and len(ids) == len(boxes)
                and r.get("no_target") is (not boxes) and all(_box_ok(b) for b in boxes))
    return _box_ok(r.get("bbox"))


def union_box(boxes: list[list[float]]) -> list[float]:
    """The smallest [x, y, w, h] holding every box."""
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
    return [x0, y0, x1 - x0, y1 - y0]


class GroundingDataset(Dataset):
    """One item per (ref, sentence) of the refs stored in `shard_dir` (one split, e.g. OUT/val/).

    Items: image float32 [3,S,S] (letterboxed, normalised), text_ids/text_mask int64 [L], bbox float32 [4]
    normalised (cx, cy, w, h) in the input, mask float32 [S,S], ref_id, sent_idx, index, scale, offset [2],
    orig_size [2] (height, width of the stored image). Training: VG-LAW's crop/flip/translated letterbox,
    drawn from a generator seeded by (seed, epoch, index) (`set_epoch` changes it).

    Generalised refs (several targets or none, shards.schema.is_generalised_ref): `bbox` is the union of the
    targets' boxes and `mask` their merged mask (the one answer a one-instance head can give); a no-target ref
    has no box to train a one-instance head on, so training skips it (counted as no_target_one_box) unless
    `max_targets` > 0. With `max_targets` = K > 0 items also carry every target: boxes float32 [K,4]
    (normalised cx, cy, w, h, zero rows as padding), target_masks uint8 [K,S,S] and n_targets (0 for no
    target; a one-target ref gives 1); a training ref with more than K targets is skipped and counted
    (targets_over_max).

    With `context_refs` = C > 0 (training only; not with `max_targets`) items also carry up to C other objects of
    the image, `context_per_object` = E expressions each, through the same view (shards.context), in n = C * E
    slots: context_ids / context_text_mask int64 [n,L], context_masks uint8 [n,S,S], context_boxes float32 [n,4]
    (normalised cx, cy, w, h) and context_valid bool [n] (False for padding and for expressions a crop made
    untrue)."""

    def __init__(self, shard_dir: str | Path, tokenizer: Any, *, train: bool, image_size: int = 448,
                 max_len: int = 40, seed: int = 0, flip_prob: float = 0.5, crop_prob: float = 0.5,
                 mean: tuple = CLIP_MEAN, std: tuple = CLIP_STD, decoder: str = "pil", max_targets: int = 0,
                 context_refs: int = 0, context_per_object: int = 1) -> None:
        p = Path(shard_dir)
        if context_refs and max_targets:
            raise ValueError("context_refs and max_targets cannot be combined (both use the view's extra masks)")
        if not p.is_dir():
            raise DataError(f"{p}: grounding split directory not found")
        paths, _ = resolve_shards(str(p))
        self.tok, self.train, self.size, self.max_len, self.seed = tokenizer, train, image_size, max_len, seed
        self.flip_prob, self.crop_prob, self.mean, self.std, self.decoder = flip_prob, crop_prob, mean, std, decoder
        self.epoch = 0
        self.max_targets = int(max_targets)
        self.context_refs = int(context_refs) if train else 0
        self.context_per_object = int(context_per_object)
        self.context_slots = self.context_refs * self.context_per_object
        self.skips: Counter = Counter()
        self.index = TarIndex(paths)
        self.skips.update(self.index.problems)
        self.images: list[dict] = []          # per stored image: key, sample index, width, height, refs
        self.items: list[tuple[int, int, int]] = []     # (image, ref, sentence)
        for si in range(len(self.index)):
            self._add_image(si)
        if not self.items:
            raise DataError(f"{p}: no referring expressions found in the shards")

    def _add_image(self, si: int) -> None:
        key, members = self.index.keys[si], self.index.members[si]
        if "json" not in members or not any(e in members for e in _IMAGE_EXTS):
            self.skips["incomplete_sample"] += 1
            return
        try:
            meta = json.loads(self.index.read(si, "json"))
            w, h = int(meta["width"]), int(meta["height"])
            if not isinstance(meta, dict) or w <= 0 or h <= 0 or not isinstance(meta.get("refs") or [], list):
                raise ValueError("not a grounding record")
            refs = [r for r in meta.get("refs") or [] if _usable_ref(r)]
            self.skips["bad_ref"] += len(meta.get("refs") or []) - len(refs)
        except (ValueError, KeyError, TypeError, AttributeError, DecodeError) as e:
            self.skips["bad_json"] += 1
            log.warning("%s: skipped (bad JSON: %s)", key, e)
            return
        img_i = len(self.images)
        self.images.append({"key": key, "sample": si, "width": w, "height": h, "refs": refs,
                            "image_id": meta.get("image_id"), "ext": next(e for e in _IMAGE_EXTS if e in members)})
        for ri, r in enumerate(refs):
            if self.train and is_generalised_ref(r):
                why = ("no_target_one_box" if not self.max_targets and r["no_target"] else
                       "targets_over_max" if self.max_targets and len(r["bboxes"]) > self.max_targets else None)
                if why:
                    self.skips[why] += len(r.get("sentences") or [])
                    continue
            for k, sent in enumerate(r.get("sentences") or []):
                if isinstance(sent, str) and clean_caption(sent, 1000):
                    self.items.append((img_i, ri, k))
                else:
                    self.skips["empty_sentence"] += 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def target(self, index: int) -> dict:
        """Ground truth of item `index` in stored-image pixels (what the evaluator scores against)."""
        img_i, ri, k = self.items[index]
        im, ref = self.images[img_i], self.images[img_i]["refs"][ri]
        out = {"index": index, "key": im["key"], "image_id": im["image_id"], "ref_id": ref.get("ref_id"),
               "ann_id": ref.get("ann_id"), "sentence": k, "text": ref["sentences"][k],
               "size": [im["height"], im["width"]], "generalised": is_generalised_ref(ref)}
        if out["generalised"]:    # every target (none for no target); no single bbox/mask
            masks = ref.get("masks") or [None] * len(ref["bboxes"])
            out.update(ann_ids=list(ref["ann_ids"]), no_target=bool(ref["no_target"]), bbox=None, mask=None,
                       bboxes=[[float(x) for x in b] for b in ref["bboxes"]], masks=masks)
        else:
            out.update(bbox=[float(x) for x in ref["bbox"]], mask=ref.get("mask"))
        return out

    def raw_image(self, index: int) -> np.ndarray:
        """The stored image of item `index` as an RGB uint8 array [H, W, 3] (for pictures and error analysis)."""
        im = self.images[self.items[index][0]]
        return decode_image(self.index.read(im["sample"], im["ext"]), self.decoder).permute(1, 2, 0).numpy()

    def _mask(self, ref: dict, h: int, w: int) -> torch.Tensor:
        return self._mask_of(ref.get("mask"), ref["bbox"], h, w)

    def _targets(self, ref: dict, h: int, w: int) -> tuple[list[float], torch.Tensor, list, torch.Tensor]:
        """(box for the view, its mask, every target box, every target mask uint8 [T,h,w]) of one ref: a one-target
        ref is its own single target; a generalised one gives the union box (the whole image for no target),
        the merged mask, and its targets."""
        if not is_generalised_ref(ref):
            m = self._mask(ref, h, w)
            return ref["bbox"], m, [ref["bbox"]], m[None]
        boxes = ref["bboxes"]
        rles = ref.get("masks") or [None] * len(boxes)
        masks = torch.stack([self._mask_of(r, b, h, w) for r, b in zip(rles, boxes)]) if boxes else \
            torch.zeros(0, h, w, dtype=torch.uint8)
        merged = masks.amax(0) if boxes else torch.zeros(h, w, dtype=torch.uint8)
        return (union_box(boxes) if boxes else [0.0, 0.0, float(w), float(h)]), merged, boxes, masks

    def _mask_of(self, rle: Any, bbox: list, h: int, w: int) -> torch.Tensor:
        if rle and isinstance(rle, dict):
            if list(rle.get("size", [])) == [h, w]:
                try:
                    return torch.from_numpy(decode_mask(rle).astype(np.uint8))
                except ValueError:
                    self.skips["mask_undecodable"] += 1
            else:
                self.skips["mask_size_mismatch"] += 1
        else:
            self.skips["mask_from_box"] += 1
        m = torch.zeros(h, w, dtype=torch.uint8)       # no usable mask: the box region (counted)
        x, y, bw, bh = bbox
        m[int(y):int(math.ceil(y + bh)), int(x):int(math.ceil(x + bw))] = 1
        return m

    def _decode(self, im: dict) -> torch.Tensor:
        img = decode_image(self.index.read(im["sample"], im["ext"]), self.decoder)
        if tuple(img.shape[-2:]) != (im["height"], im["width"]):
            raise DecodeError(f"image is {tuple(img.shape[-2:])}, JSON says {(im['height'], im['width'])}")
        return img

    def __getitem__(self, index: int) -> dict:
        bad = 0
        for attempt in range(len(self.items) if self.train else 1):
            # training: an undecodable image is skipped (counted) and the next expression taken, deterministically;
            # evaluation: every expression is scored once, on a grey image when its own does not decode (counted)
            i = (index + attempt) % len(self.items)
            img_i, ri, k = self.items[i]
            im = self.images[img_i]
            try:
                img = self._decode(im)
                break
            except DecodeError as e:
                bad += 1
                self.skips["bad_image"] += 1
                log.warning("%s: undecodable image (%s); %s", im["key"], e,
                            "taking the next expression" if self.train else "scoring it on a grey image")
        else:
            img = None
        if img is None:
            if self.train:
                raise DataError(f"{self.index.paths[0]}: no decodable image in the training split")
            img = torch.full((3, im["height"], im["width"]), 124, dtype=torch.uint8)
        item = self._item(i, img)
        item["skipped"] = torch.tensor(bad, dtype=torch.long)
        return item

    def _item(self, index: int, img: torch.Tensor) -> dict:
        img_i, ri, k = self.items[index]
        im = self.images[img_i]
        ref = im["refs"][ri]
        h, w = im["height"], im["width"]
        text = clean_caption(ref["sentences"][k], 1000)
        rng = np.random.default_rng([self.seed, self.epoch, index]) if self.train else None
        box, mask, boxes, masks = self._targets(ref, h, w)
        multi = {"extra_boxes": boxes, "extra_masks": masks} if self.max_targets else {}
        context = []
        if self.context_refs:     # its own generator: the item's view is the same with or without context
            context = choose_context(im["refs"], ri, self.context_refs,
                                     np.random.default_rng([self.seed, self.epoch, index, 1]), self.context_per_object)
            if context:
                multi = {"extra_boxes": [im["refs"][j]["bbox"] for j, _ in context],
                         "extra_masks": torch.stack([self._mask(im["refs"][j], h, w) for j, _ in context])}
        v = grounding_view(img, box, mask, text, train=self.train, size=self.size, rng=rng,
                           flip_prob=self.flip_prob, crop_prob=self.crop_prob,
                           crop_allowed=not has_direction_words(text), **multi)
        enc = self.tok(v["text"], padding="max_length", truncation=True, max_length=self.max_len,
                       return_attention_mask=True)
        item = {
            "image": normalize(v["image"], self.mean, self.std),
            "text_ids": torch.tensor(enc["input_ids"], dtype=torch.long),
            "text_mask": torch.tensor(enc["attention_mask"], dtype=torch.long),
            "bbox": v["bbox"].float(), "mask": v["mask"].float(),
            "ref_id": torch.tensor(int(ref.get("ref_id", -1)), dtype=torch.long),
            "sent_idx": torch.tensor(k, dtype=torch.long), "index": torch.tensor(index, dtype=torch.long),
            "scale": torch.tensor(v["scale"], dtype=torch.float32),
            "offset": torch.tensor(v["offset"], dtype=torch.float32),
            "orig_size": torch.tensor([h, w], dtype=torch.long),
        }
        if self.max_targets:
            K, n = self.max_targets, min(len(boxes), self.max_targets)
            item["boxes"] = torch.zeros(K, 4)
            item["boxes"][:n] = v["boxes"][:n].float()
            item["target_masks"] = torch.zeros(K, self.size, self.size, dtype=torch.uint8)
            item["target_masks"][:n] = v["masks"][:n]
            item["n_targets"] = torch.tensor(n, dtype=torch.long)
        if self.context_refs:
            item.update(self._context_item(context, v, im["refs"]))
        return item

    def _context_item(self, context: list[tuple[int, str]], v: dict, refs: list[dict]) -> dict:
        """The context tensors of one item from its chosen (ref, sentence) pairs and the item's view."""
        C, L, S = self.context_slots, self.max_len, self.size
        out = {"context_ids": torch.zeros(C, L, dtype=torch.long),
               "context_text_mask": torch.zeros(C, L, dtype=torch.long),
               "context_masks": torch.zeros(C, S, S, dtype=torch.uint8),
               "context_boxes": torch.zeros(C, 4),
               "context_valid": torch.zeros(C, dtype=torch.bool)}
        if not context:
            return out
        texts = [swap_left_right(t) if v["flipped"] else t for _, t in context]
        enc = self.tok(texts, padding="max_length", truncation=True, max_length=L, return_attention_mask=True)
        n = len(context)
        out["context_ids"][:n] = torch.tensor(enc["input_ids"], dtype=torch.long)
        out["context_text_mask"][:n] = torch.tensor(enc["attention_mask"], dtype=torch.long)
        out["context_masks"][:n] = v["masks"]
        out["context_boxes"][:n] = v["boxes"].float()
        out["context_valid"][:n] = torch.tensor([kept_in_view(t, refs[j]["bbox"], v["crop"]) for j, t in context])
        return out


def collate_grounding(items: list[dict]) -> dict:
    """Stack the per-item tensors into the grounding batch."""
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


class ExactDistributedSampler(Sampler[int]):
    """Rank r of W visits indices r, r+W, r+2W, … (optionally permuted the same way on every rank):
    every index exactly once over all ranks, no padding duplicates; rank sizes differ by at most one."""

    def __init__(self, n: int, *, rank: int, world_size: int, shuffle: bool = False, seed: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.n, self.rank, self.world, self.shuffle, self.seed, self.epoch = n, rank, world_size, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
        return iter(order[self.rank::self.world].tolist())

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


class _SkipFirst(Sampler[int]):
    """The indices of `sampler` after the first `n` (resuming mid-epoch: the same remaining order)."""

    def __init__(self, sampler: Sampler, n: int) -> None:
        self.sampler, self.n = sampler, n

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.n, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.n)


def build_grounding_loader(shard_dir: str | Path | GroundingDataset, tokenizer: Any = None, *, train: bool,
                           batch_size: int, num_workers: int, rank: int, world_size: int, epoch: int, seed: int,
                           image_size: int = 448, max_len: int = 40, start_batch: int = 0,
                           dataset: Optional[GroundingDataset] = None, paired: bool = False,
                           **dataset_kw) -> DataLoader:
    """A DataLoader of grounding batches for one rank and epoch. Training: shuffled `DistributedSampler`
    (equal steps on every rank, last partial batch dropped); `start_batch` skips the epoch's first batches
    (index-only, so a resumed run sees the same remaining batches); `paired` instead puts two expressions on one
    image naming different objects next to each other (shards.paired_sampler; use an even batch size).
    Evaluation: `ExactDistributedSampler`, in order, every expression once. `shard_dir` may be an already
    indexed `GroundingDataset` (or pass `dataset`)."""
    if isinstance(shard_dir, GroundingDataset):
        dataset = shard_dir
    ds = dataset or GroundingDataset(shard_dir, tokenizer, train=train, image_size=image_size, max_len=max_len,
                                     seed=seed, **dataset_kw)
    ds.set_epoch(epoch)
    if train and paired:
        from shards.paired_sampler import PairedExpressionSampler

        targets = [(img, ds.images[img]["refs"][ri].get("ann_id", ri)) for img, ri, _ in ds.items]
        sampler: Sampler = PairedExpressionSampler(targets, rank=rank, world_size=world_size, seed=seed)
        sampler.set_epoch(epoch)
    elif train:
        sampler = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
    else:
        sampler = ExactDistributedSampler(len(ds), rank=rank, world_size=world_size)
    if start_batch:
        sampler = _SkipFirst(sampler, start_batch * batch_size)
    return GroundingLoader(DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                      collate_fn=collate_grounding, drop_last=train,
                                      pin_memory=torch.cuda.is_available(), persistent_workers=False,
                                      generator=loader_generator(seed, epoch, rank)))


class GroundingLoader:
    """A DataLoader of grounding batches that counts, in `skips`, the images its workers could not decode
    (each item reports them; the training loop logs the totals)."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.skips: Counter = Counter()

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            n = int(batch.pop("skipped").sum())
            if n:
                self.skips["bad_image"] += n
            yield batch
