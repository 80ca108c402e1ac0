"""Pretraining sources: shard lists, per-consumer shard splits, raw sample streams, weighted mixing, skips.

The decode-free half of `shards.stream`: which shards a (rank, worker) reads in which order, the raw
(bytes + parsed JSON) samples read from them, and the weighted resampling across sources. Nothing here
decodes an image, so a resumed loader can replay it cheaply.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import braceexpand
import numpy as np
from webdataset.tariterators import tarfile_samples

from shards.inputs import InputError
from shards.manifest import read_manifest, shard_path

log = logging.getLogger(__name__)
PARTS = ("image", "region")
SOURCE_KEYS = ("name", "shards", "weight", "parts")


class DataError(ValueError):
    """A user mistake in the data section (bad path, empty shard list, bad source entry)."""


# ----------------------------------------------------------------------------------------------
# Sources and shard lists
# ----------------------------------------------------------------------------------------------
@dataclass
class Source:
    name: str
    shards: list[str]
    weight: float
    parts: tuple[str, ...] = PARTS     # which parts this source may feed (narrowed by its manifest counts)
    samples: Optional[int] = None      # from the manifest, when there is one
    shard_samples: dict = field(default_factory=dict)  # path -> sample count listed in the manifest


def resolve_shards(spec: str) -> tuple[list[str], Optional[dict]]:
    """A shard directory (manifest.json, else shard-*.tar) or a brace pattern -> (tar paths, manifest)."""
    p = Path(spec)
    if p.is_dir():
        mpath = p / "manifest.json"
        if mpath.is_file():
            try:
                manifest = read_manifest(p)
            except InputError as e:
                raise DataError(str(e)) from None
            paths = [str(shard_path(p, s)) for s in manifest["shards"]]
            missing = [x for x in paths if not os.path.isfile(x)]
            if missing:
                raise DataError(f"{missing[0]}: shard listed in {mpath} is missing")
            if not paths:
                raise DataError(f"{mpath}: lists no shards")
            return paths, manifest
        paths = sorted(glob.glob(str(p / "*.tar")))
        if not paths:
            raise DataError(f"{p}: no manifest.json and no .tar shards")
        return paths, None
    paths = [x for x in braceexpand.braceexpand(spec)]
    missing = [x for x in paths if not os.path.isfile(x)]
    if not paths or missing:
        raise DataError(f"{missing[0] if missing else spec}: shard not found (expected a shard directory or a brace pattern)")
    return paths, None


def get_field(obj: Any, key: str, default: Any = None) -> Any:
    return obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)


def parse_sources(entries: Any) -> list[Source]:
    """`data.sources` entries ({name, shards, weight[, parts]} mappings or objects) -> checked `Source`s.

    `parts` (optional) restricts a source to "image" and/or "region"; by default a source feeds each part
    its manifest counts say it has data for (captions / regions), or both when it has no manifest."""
    if not entries:
        raise DataError("data.sources: no sources given")
    if not isinstance(entries, (list, tuple)):
        raise DataError(f"data.sources: expected a list of {{name, shards, weight}} entries, got {entries!r:.80}")
    out = []
    for i, e in enumerate(entries):
        if isinstance(e, dict):
            unknown = sorted(str(k) for k in set(e) - set(SOURCE_KEYS))
            if unknown:
                raise DataError(f"data.sources[{i}]: unknown key '{unknown[0]}' (valid keys: {', '.join(SOURCE_KEYS)})")
        elif not hasattr(e, "name"):
            raise DataError(f"data.sources[{i}]: expected a mapping with {', '.join(SOURCE_KEYS)}, got {e!r:.80}")
        name, spec, weight = get_field(e, "name"), get_field(e, "shards"), get_field(e, "weight", 1.0)
        if not name or not spec or not isinstance(name, str) or not isinstance(spec, str):
            raise DataError(f"data.sources[{i}]: needs 'name' and 'shards' strings")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight) or weight <= 0:
            raise DataError(f"data.sources[{i}] ({name}): weight must be a positive number, got {weight!r}")
        parts = get_field(e, "parts", None) or PARTS
        if isinstance(parts, str) or not isinstance(parts, (list, tuple)) or any(x not in PARTS for x in parts):
            raise DataError(f"data.sources[{i}] ({name}): parts must be a subset of {list(PARTS)}, got {parts!r}")
        parts = tuple(parts)
        paths, manifest = resolve_shards(str(spec))
        samples, shard_samples = None, {}
        if manifest is not None:
            samples = manifest.get("samples")
            shard_samples = {path: s.get("samples") for path, s in zip(paths, manifest["shards"])
                             if isinstance(s.get("samples"), int)}
            if get_field(e, "parts", None) is None:
                parts = tuple(p for p, k in (("image", "captions"), ("region", "regions"))
                              if not isinstance(manifest.get(k), int) or manifest[k] > 0)
        out.append(Source(str(name), paths, float(weight), parts, samples, shard_samples))
    return out


def consumer_shards(shards: list[str], *, seed: int, epoch: int, source_index: int, pass_index: int,
                    consumer: int, n_consumers: int) -> tuple[list[str], Optional[tuple[int, int]]]:
    """The shards one consumer reads in one pass, and (k, n) when it must keep every n-th sample from k."""
    rng = np.random.default_rng([seed, epoch, source_index, pass_index, 7919])
    order = [shards[i] for i in rng.permutation(len(shards))]
    if len(order) >= n_consumers:
        return order[consumer::n_consumers], None
    return order, (consumer, n_consumers)


# ----------------------------------------------------------------------------------------------
# Skips
# ----------------------------------------------------------------------------------------------
class SkipCounter:
    """Counts skipped samples by reason; `handler` is a webdataset exception handler that never raises."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self._logged = 0

    def add(self, reason: str, detail: str = "") -> None:
        self.counts[reason] += 1
        if self._logged < 20:                       # a few examples, then only the summary
            self._logged += 1
            log.warning("skipped sample (%s) %s", reason, detail[:200])

    def handler(self, exn: BaseException) -> bool:
        if isinstance(exn, (tarfile.ReadError, EOFError)) or "tar" in type(exn).__module__:
            reason = "bad_tar"
        elif isinstance(exn, OSError):
            reason = "unreadable_shard"
        else:
            reason = "bad_sample"
        self.add(reason, f"{type(exn).__name__}: {exn}")
        return True


# ----------------------------------------------------------------------------------------------
# Raw sample streams (no decoding)
# ----------------------------------------------------------------------------------------------
@dataclass
class Raw:
    key: str
    source: int
    jpg: bytes
    meta: dict


def _read_pass(src: Source, shards: list[str], keep: Optional[tuple[int, int]], index: int,
               skips: SkipCounter) -> Iterator[Raw]:
    n = 0
    per_shard: Counter = Counter()
    for sample in tarfile_samples([{"url": u} for u in shards], handler=skips.handler):
        n += 1
        per_shard[sample.get("__url__")] += 1
        if keep is not None and (n - 1) % keep[1] != keep[0]:
            continue
        key = sample.get("__key__", "?")
        if "json" not in sample:
            skips.add("missing_json", key)
            continue
        img = sample.get("jpg", sample.get("jpeg", sample.get("png")))
        if img is None:
            skips.add("missing_image", key)
            continue
        try:
            meta = json.loads(sample["json"])
            if not isinstance(meta, dict) or not all(isinstance(meta.get(k), int) and not isinstance(meta[k], bool)
                                                     and meta[k] > 0 for k in ("width", "height")):
                raise ValueError("no positive integer width/height")
        except (ValueError, KeyError, TypeError) as e:
            skips.add("bad_json", f"{key}: {e}")
            continue
        yield Raw(key, index, img, meta)
    # tarfile ends a stream cut at a header boundary silently: compare with the manifest's counts
    for u in shards:
        want = src.shard_samples.get(u)
        if want is not None and per_shard[u] < want:
            for _ in range(want - per_shard[u]):
                skips.add("truncated_shard", u)


def endless_source(src: Source, index: int, part: str, *, seed: int, epoch: int, consumer: int, n_consumers: int,
             skips: SkipCounter) -> Iterator[Raw]:
    """Passes over one consumer's share of a source; stops (drops the source) after a pass with no
    usable sample for `part`."""
    pass_index = 0
    while True:
        shards, keep = consumer_shards(src.shards, seed=seed, epoch=epoch, source_index=index * 2 + PARTS.index(part),
                                       pass_index=pass_index, consumer=consumer, n_consumers=n_consumers)
        useful = 0
        for raw in _read_pass(src, shards, keep, index, skips):
            if _has_part(raw.meta, part):
                useful += 1
                yield raw
        if useful == 0:
            log.warning("source %s gives no %s samples to consumer %d of %d; dropped for this epoch",
                        src.name, part, consumer, n_consumers)
            return
        pass_index += 1


def _has_part(meta: dict, part: str) -> bool:
    value = meta.get("captions") if part == "image" else meta.get("regions")
    return isinstance(value, list) and bool(value)


def mix_sources(streams: list[Iterator[Raw]], weights: list[float], rng: np.random.Generator) -> Iterator[Raw]:
    """Weighted resampling across source streams; a finished (dropped) stream leaves the mix."""
    streams, weights = list(streams), list(weights)
    while streams:
        cum = np.cumsum(weights)
        for u in rng.random(256) * cum[-1]:          # draws in blocks: one numpy call per 256 samples
            k = min(int(np.searchsorted(cum, u, side="right")), len(streams) - 1)
            try:
                yield next(streams[k])
            except StopIteration:
                del streams[k], weights[k]
                break
