"""The parallel, resumable shard writer every converter ends in.

A converter turns its raw annotations into a deterministic list of ``Item``s; ``build_shards`` cuts the
list into shards of ``samples_per_shard`` items (shard i holds items[i*n:(i+1)*n] minus the skipped ones),
and each shard is one task for a worker process: it reads, repairs and re-encodes the images, moves boxes
and masks into the stored image's pixels, writes ``shard-XXXXXX.tar`` under a temporary name and renames
it when complete. The output therefore does not depend on ``workers``, and a rerun after a kill skips the
shards that were finished. Image bytes never travel between processes.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_all_start_methods, get_context
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from shards.images import BadImage, encode_jpeg, load_rgb
from shards.inputs import InputError, writable_dir
from shards.manifest import STATS_DIR, assemble, sample_counts, sha256_file, write_json_atomic
from shards.masks import decode_mask
from shards.schema import JPEG_QUALITY, MANIFEST, SCHEMA_VERSION, SHARD_PATTERN, clean_text, validate_record

TAR_MTIME = 946684800  # 2000-01-01: fixed so shard bytes are reproducible


@dataclass
class Item:
    """One image to write, with its annotations in ORIGINAL annotation pixels."""
    key: str                                  # shards.schema.make_key(source, image_id)
    image: str | tuple[str, str]              # a file path, or (tar path, member name)
    record: dict                              # source, image_id, captions, regions, refs (see DESIGN.md)
    ann_size: tuple[int, int] | None = None   # (width, height) the coordinates refer to; None = the file's size


def build_shards(items: Sequence[Item], out_dir: str | Path, *, source: str, args: dict, workers: int = 1,
                 samples_per_shard: int = 1000, max_side: int | None = 640, extra_skips: dict | None = None,
                 extra_counts: dict | None = None) -> dict:
    """Write ``items`` as WebDataset shards plus ``manifest.json`` into ``out_dir``; return the manifest.

    ``args`` (the converter's arguments, recorded in the manifest), ``extra_skips`` (what the converter
    dropped before building, by reason) and ``extra_counts`` end up in the manifest as they are.
    """
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    keys = [it.key for it in items]
    if len(set(keys)) != len(keys):
        dup = next(k for k, c in Counter(keys).items() if c > 1)
        raise ValueError(f"duplicate sample key {dup!r}: converters must emit one item per image")
    out = Path(out_dir)
    _claim(out, source, args)
    settings = {"schema": SCHEMA_VERSION, "max_side": max_side, "samples_per_shard": samples_per_shard,
                "jpeg_quality": JPEG_QUALITY}
    n_shards = math.ceil(len(items) / samples_per_shard)
    _remove_stale(out, n_shards)

    tasks, stats = [], {}
    for i in range(n_shards):
        chunk = list(items[i * samples_per_shard:(i + 1) * samples_per_shard])
        fp = _fingerprint(settings, chunk)
        done = _finished_stats(out, i, fp)
        if done is not None:
            stats[i] = done
        else:
            tasks.append((str(out), i, chunk, max_side, fp))

    bar = tqdm(total=len(items), initial=sum(s["items"] for s in stats.values()), unit="img",
               desc=f"{source} -> {out}", dynamic_ncols=True, mininterval=1.0)
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            s = _build_shard(*t)
            stats[s["index"]] = s
            bar.update(s["items"])
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=pool_context()) as ex:
            futures = [ex.submit(_build_shard, *t) for t in tasks]
            for f in as_completed(futures):
                s = f.result()
                stats[s["index"]] = s
                bar.update(s["items"])
    bar.close()

    manifest = assemble([stats[i] for i in range(n_shards)], source=source, args=args, settings=settings,
                        extra_skips=extra_skips, extra_counts=extra_counts, items=len(items))
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def pool_context() -> BaseContext:
    """Where worker processes come from: a fork server that has imported this module once (workers then
    start in milliseconds, and every later build in the same process reuses it), else spawn. Neither
    forks the caller itself, which may hold threads (torch, tqdm)."""
    if "forkserver" in get_all_start_methods():
        ctx = get_context("forkserver")
        ctx.set_forkserver_preload(["__main__", __name__])
        return ctx
    return get_context("spawn")


# ---------------------------------------------------------------------------------------------- resume


def _stats_path(out: Path, index: int) -> Path:
    return out / STATS_DIR / (SHARD_PATTERN % index).replace(".tar", ".json")


def _fingerprint(settings: dict, chunk: list[Item]) -> str:
    """Hash of everything that determines a shard's bytes, so a rerun with other inputs rebuilds it."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for it in chunk:
        h.update(json.dumps(asdict(it), sort_keys=True, default=str).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _finished_stats(out: Path, index: int, fingerprint: str) -> dict | None:
    sp, tar = _stats_path(out, index), out / (SHARD_PATTERN % index)
    if not (sp.is_file() and tar.is_file()):
        return None
    try:
        s = json.loads(sp.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if s.get("fingerprint") != fingerprint or s.get("bytes") != tar.stat().st_size:
        return None
    return s


OWNER = "owner.json"   # in STATS_DIR: which command writes this directory


def _claim(out: Path, source: str, args: dict) -> None:
    """Make ``out`` this build's, or refuse (InputError) when it holds a shard set another command wrote:
    a manifest or build record of another source or other arguments, or shard tars with no build record.
    A rerun of the same command (resume) is this build's own."""
    owner = {"source": source, "args": _owner_args(args)}
    writable_dir(out)
    rec = out / STATS_DIR / OWNER
    theirs = None
    if rec.is_file():
        try:
            theirs = json.loads(rec.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            theirs = {"source": "?", "args": "unreadable build record"}
    elif (out / MANIFEST).is_file():
        try:
            m = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
            theirs = ({"source": m.get("source"), "args": _owner_args(m.get("args"))} if isinstance(m, dict)
                      else {"source": "?"})
        except (OSError, ValueError):
            theirs = {"source": "?", "args": "unreadable manifest"}
    elif any(out.glob("shard-*.tar")):
        raise InputError(out, "already holds shard-*.tar files that this build did not write; choose another "
                              "--out or remove them")
    if theirs is not None and theirs != owner:
        diff = "source" if theirs.get("source") != source else "arguments"
        raise InputError(out, f"holds a shard set written by another command ({diff} differ: "
                              f"{theirs.get('source')!s:.40}); choose another --out or remove it")
    (out / STATS_DIR).mkdir(parents=True, exist_ok=True)
    if theirs is None:
        write_json_atomic(rec, owner)


def _owner_args(args: Any) -> Any:
    """The arguments that identify a build (not where it writes, not how many workers; input paths resolved, so
    `coco/train2017` and `./coco/train2017/` are one build)."""
    if not isinstance(args, dict):
        return args
    return {k: os.path.realpath(v) if isinstance(v, str) and v and os.path.exists(v) else v
            for k, v in args.items() if k not in ("workers", "out")}


def _remove_stale(out: Path, n_shards: int) -> None:
    """Delete temporaries of killed runs and shards beyond the current count (from a larger earlier run)."""
    for p in list(out.glob("*.tmp-*")) + list((out / STATS_DIR).glob("*.tmp-*")):
        p.unlink(missing_ok=True)
    for p in out.glob("shard-*.tar"):
        try:
            idx = int(p.stem.split("-")[1])
        except (IndexError, ValueError):
            continue
        if idx >= n_shards:
            p.unlink()
            _stats_path(out, idx).unlink(missing_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the manifest is only valid for a finished build


# ---------------------------------------------------------------------------------------------- worker


def _build_shard(out_dir: str, index: int, chunk: list[Item], max_side: int | None, fingerprint: str) -> dict:
    """Convert one shard's items and write the tar (temp name, then rename); return its statistics."""
    out = Path(out_dir)
    name = SHARD_PATTERN % index
    skipped: Counter = Counter()
    repaired: Counter = Counter()
    records = []
    tmp = out / f"{name}.tmp-{os.getpid()}"
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
        for item in chunk:
            try:
                res = convert_item(item, max_side, skipped, repaired)
            except AssertionError:
                raise
            except Exception as e:  # one odd sample must not end a million-image job: count and report it
                skipped["sample_error"] += 1
                print(f"warning: {item.key}: skipped ({type(e).__name__}: {e})", file=sys.stderr)
                continue
            if res is None:
                continue
            jpg, rec = res
            payload = json.dumps(rec, ensure_ascii=False, separators=(",", ":"), default=_json_scalar).encode("utf-8")
            _add_member(tf, f"{item.key}.jpg", jpg)
            _add_member(tf, f"{item.key}.json", payload)
            records.append(rec)
    _close_tar_cache()
    stats = {"index": index, "name": name, "items": len(chunk), "samples": len(records),
             "sha256": sha256_file(tmp), "bytes": tmp.stat().st_size, "fingerprint": fingerprint,
             "counts": sample_counts(records), "skipped": dict(skipped), "repaired": dict(repaired)}
    write_json_atomic(_stats_path(out, index), stats)
    os.replace(tmp, out / name)  # the tar appears last: its presence (with stats) means "done"
    return stats


def _json_scalar(v: Any) -> Any:
    """numpy scalars (e.g. ids read with numpy) as plain Python numbers."""
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"{type(v).__name__} is not JSON serializable")


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(data), TAR_MTIME, 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    tf.addfile(ti, io.BytesIO(data))


_TAR_CACHE: dict[str, tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]] = {}


def _close_tar_cache() -> None:
    for tf, _ in _TAR_CACHE.values():
        tf.close()
    _TAR_CACHE.clear()


def read_image_bytes(src: str | tuple[str, str]) -> bytes:
    """Bytes of a file, or of a member of a tar (each tar is indexed once per worker, not per lookup)."""
    if isinstance(src, str):
        with open(src, "rb") as f:
            return f.read()
    tar_path, member = src
    if tar_path not in _TAR_CACHE:
        tf = tarfile.open(tar_path, "r")
        _TAR_CACHE[tar_path] = (tf, {m.name: m for m in tf.getmembers() if m.isfile()})
    tf, index = _TAR_CACHE[tar_path]
    if member not in index:
        raise FileNotFoundError(f"{tar_path}:{member}")
    f = tf.extractfile(index[member])
    return f.read()


def convert_item(item: Item, max_side: int | None, skipped: Counter, repaired: Counter
                 ) -> tuple[bytes, dict] | None:
    """Re-encoded JPEG bytes and the schema record of one item, or None (reason added to ``skipped``)."""
    src = item.image
    name = src if isinstance(src, str) else src[1]
    try:
        data = read_image_bytes(src)
    except FileNotFoundError:
        skipped["image_missing"] += 1
        return None
    except (OSError, tarfile.TarError):
        skipped["image_unreadable"] += 1
        return None
    try:
        im, orig, fixes = load_rgb(data, name, max_side)
    except BadImage as e:
        skipped[e.reason] += 1
        return None
    repaired.update(fixes)
    w, h = im.size
    aw, ah = item.ann_size or orig
    sx, sy = w / aw, h / ah
    src_rec = item.record
    rec: dict[str, Any] = {"schema": SCHEMA_VERSION, "source": str(src_rec["source"]),
                           "image_id": str(src_rec["image_id"]), "width": w, "height": h,
                           "orig_width": int(aw), "orig_height": int(ah)}
    captions = _clean_texts(src_rec.get("captions", []), skipped)
    regions = []
    for r in src_rec.get("regions", []):
        text, why = clean_text(r.get("text"))
        if why:
            skipped[why] += 1
            continue
        box = _scale_clip(r.get("bbox"), sx, sy, w, h, skipped, repaired)
        if box is not None:
            regions.append({"bbox": box, "text": text, "kind": r.get("kind", "region")})
    refs = [ref for r in src_rec.get("refs", [])
            if (ref := _convert_ref(r, sx, sy, w, h, skipped, repaired)) is not None]
    if captions:
        rec["captions"] = captions
    if regions:
        rec["regions"] = regions
    if refs:
        rec["refs"] = refs
    if not (captions or regions or refs):
        skipped["no_annotations"] += 1
        return None
    problems = validate_record(rec)
    if problems:  # a bug in this module, not in the data: fail loudly rather than write it
        raise AssertionError(f"{item.key}: invalid record: {problems}")
    return encode_jpeg(im), rec


def _clean_texts(texts: Any, skipped: Counter) -> list[str]:
    out = []
    for t in texts if isinstance(texts, list) else [texts]:
        if isinstance(t, dict):  # refer-style sentence dicts
            t = t.get("sent", t.get("raw"))
        text, why = clean_text(t)
        if why:
            skipped[why] += 1
        else:
            out.append(text)
    return out


def _scale_clip(bbox: Any, sx: float, sy: float, w: int, h: int, skipped: Counter, repaired: Counter
                ) -> list[float] | None:
    """[x, y, w, h] in annotation pixels -> stored pixels, clipped to the image; None if nothing is left."""
    try:
        x, y, bw, bh = (float(v) for v in bbox)
    except (TypeError, ValueError):
        skipped["box_malformed"] += 1
        return None
    if not all(math.isfinite(v) for v in (x, y, bw, bh)):
        skipped["box_malformed"] += 1
        return None
    x1, y1, x2, y2 = x * sx, y * sy, (x + bw) * sx, (y + bh) * sy
    cx1, cy1 = min(max(x1, 0.0), w), min(max(y1, 0.0), h)
    cx2, cy2 = min(max(x2, 0.0), w), min(max(y2, 0.0), h)
    cx1, cy1, cx2, cy2 = (round(v, 2) for v in (cx1, cy1, cx2, cy2))
    if cx2 - cx1 <= 0 or cy2 - cy1 <= 0:
        skipped["box_zero_area"] += 1
        return None
    if (cx1, cy1, cx2, cy2) != tuple(round(v, 2) for v in (x1, y1, x2, y2)):
        repaired["box_clipped"] += 1
    return [cx1, cy1, round(cx2 - cx1, 2), round(cy2 - cy1, 2)]


def _convert_ref(r: dict, sx: float, sy: float, w: int, h: int, skipped: Counter, repaired: Counter
                 ) -> dict | None:
    sentences = _clean_texts(r.get("sentences", []), skipped)
    if not sentences:
        skipped["ref_no_sentences"] += 1
        return None
    if "ann_ids" in r:
        return _convert_generalised_ref(r, sentences, sx, sy, w, h, skipped, repaired)
    box = _scale_clip(r.get("bbox"), sx, sy, w, h, skipped, repaired)
    if box is None:
        skipped["ref_bad_box"] += 1
        return None
    out = {k: v for k, v in r.items() if k not in ("segmentation", "bbox", "sentences", "mask")}
    out.update(bbox=box, sentences=sentences)
    seg = r.get("segmentation")
    if seg is not None:
        try:
            out["mask"] = segmentation_to_rle(seg, sx, sy, w, h)
        except Exception:  # pycocotools raises bare Exceptions on malformed input
            skipped["ref_bad_segmentation"] += 1
            return None
    return out


def _convert_generalised_ref(r: dict, sentences: list[str], sx: float, sy: float, w: int, h: int,
                             skipped: Counter, repaired: Counter) -> dict | None:
    """A ref with several targets or none (shards.schema.is_generalised_ref): every target's box is scaled and
    clipped and its segmentation becomes one RLE in `masks`; a target that cannot be kept drops the whole ref
    (a ref missing one of its targets would be a wrong answer key), counted as ref_bad_box/ref_bad_segmentation."""
    boxes, masks = [], []
    segs = r.get("segmentations") or [None] * len(r["ann_ids"])
    for bbox, seg in zip(r.get("bboxes", []), segs):
        box = _scale_clip(bbox, sx, sy, w, h, skipped, repaired)
        if box is None:
            skipped["ref_bad_box"] += 1
            return None
        boxes.append(box)
        if seg is not None:
            try:
                masks.append(segmentation_to_rle(seg, sx, sy, w, h))
            except Exception:  # pycocotools raises bare Exceptions on malformed input
                skipped["ref_bad_segmentation"] += 1
                return None
    out = {k: v for k, v in r.items() if k not in ("segmentations", "bboxes", "sentences", "masks")}
    out.update(bboxes=boxes, sentences=sentences, no_target=not boxes)
    if masks and len(masks) == len(boxes):
        out["masks"] = masks
    return out


def segmentation_to_rle(seg: Any, sx: float, sy: float, w: int, h: int) -> dict:
    """A COCO segmentation (polygons, uncompressed or compressed RLE, or a list of RLEs as in RefCLEF)
    in annotation pixels -> one compressed RLE ``{"size": [h, w], "counts": str}`` at the stored size.

    Polygons are scaled before rasterising (exact geometry); RLEs are decoded at their own size, resized
    with nearest neighbour and re-encoded. Several parts are merged (union).
    """
    if isinstance(seg, dict):
        seg = [seg]
    if not isinstance(seg, list) or not seg:
        raise ValueError("empty segmentation")
    if all(isinstance(p, list) for p in seg):
        polys = [[float(v) * (sx if i % 2 == 0 else sy) for i, v in enumerate(p)]
                 for p in seg if len(p) >= 6 and len(p) % 2 == 0]
        if not polys:
            raise ValueError("no polygon with 3 or more points")
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    elif all(isinstance(p, dict) for p in seg):
        m = np.zeros((h, w), dtype=np.uint8)
        for part in seg:
            rh, rw = (int(v) for v in part["size"])
            dec = decode_mask({"size": [rh, rw], "counts": part["counts"]}).astype(np.uint8)
            if (rh, rw) != (h, w):
                rows = np.minimum(((np.arange(h) + 0.5) * rh / h).astype(np.int64), rh - 1)
                cols = np.minimum(((np.arange(w) + 0.5) * rw / w).astype(np.int64), rw - 1)
                dec = dec[np.ix_(rows, cols)]
            m |= dec
        rle = mask_utils.encode(np.asfortranarray(m))
    else:
        raise ValueError("segmentation mixes polygons and RLEs")
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}
