"""``python -m shards inspect DIR [--check]``: what a shard directory holds, and whether it is intact.

DIR is a shard directory (``manifest.json`` + ``shard-*.tar``) or a grounding root with one such
directory per split. ``--check`` re-hashes every shard, decodes every image, JSON record and mask, checks
boxes and masks against the stored size and every count against the manifest.
"""
from __future__ import annotations

import json
import tarfile
import warnings
from pathlib import Path
from typing import Iterator

from PIL import Image
from pycocotools import mask as mask_utils

from shards.inputs import InputError
from shards.imagecheck import HeaderProblem, open_checked
from shards.manifest import COUNT_KEYS, read_manifest, sample_counts, sha256_file, shard_path
from shards.masks import decode_mask
from shards.schema import MANIFEST, make_key, validate_record


def shard_dirs(root: str | Path) -> list[Path]:
    """``root`` itself when it holds a manifest, else its split subdirectories that do."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "no such directory")
    if (root / MANIFEST).is_file():
        return [root]
    subs = sorted(p for p in root.iterdir() if (p / MANIFEST).is_file())
    if not subs:
        raise InputError(root, f"no {MANIFEST} here or in any subdirectory (not a shard directory)")
    return subs


def iter_tar_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample, grouping consecutive members as WebDataset does (key = up to the first dot)."""
    key, group = None, {}
    with tarfile.open(path, "r") as tf:
        for m in tf:
            if not m.isfile():
                continue
            k, _, ext = m.name.partition(".")
            if k != key and group:
                yield key, group
                group = {}
            key = k
            group[ext] = tf.extractfile(m).read()
    if group:
        yield key, group


def check_dir(d: Path) -> list[str]:
    """Every mismatch between the shards in ``d`` and its manifest (an empty list: intact)."""
    m = read_manifest(d)
    problems: list[str] = []
    listed = {s["name"] for s in m["shards"]}  # read_manifest checked every entry
    for p in sorted(d.glob("shard-*.tar")):
        if p.name not in listed:
            problems.append(f"{p}: shard not in the manifest")
    records, seen = [], set()
    for s in m["shards"]:
        p = shard_path(d, s)
        if not p.is_file():
            problems.append(f"{p}: missing")
            continue
        if "sha256" not in s or "samples" not in s:
            problems.append(f"{p}: manifest entry lacks sha256 or samples")
        elif sha256_file(p) != s["sha256"]:
            problems.append(f"{p}: sha256 differs from the manifest")
        n = 0
        try:
            for key, group in iter_tar_samples(p):
                n += 1
                problems += [f"{p}:{key}: {x}" for x in _check_sample(key, group, seen, records)]
        except (tarfile.TarError, OSError) as e:
            problems.append(f"{p}: unreadable tar ({e})")
        if n != s.get("samples"):
            problems.append(f"{p}: {n} samples, manifest says {s.get('samples')}")
    if len(records) != m.get("samples"):
        problems.append(f"{d}: {len(records)} samples, manifest says {m.get('samples')}")
    counts = sample_counts(records)
    for k in COUNT_KEYS + ("regions_by_kind", "refs_by_split", "sentences_by_split"):
        if counts[k] != m.get(k):
            problems.append(f"{d}: {k} = {counts[k]}, manifest says {m.get(k)}")
    return problems


def _check_sample(key: str, group: dict[str, bytes], seen: set, records: list) -> list[str]:
    if set(group) != {"jpg", "json"}:
        return [f"members {sorted(group)} != ['jpg', 'json']"]
    if key in seen:
        return ["duplicate key"]
    seen.add(key)
    try:
        rec = json.loads(group["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return [f"JSON does not decode ({e})"]
    problems = validate_record(rec)
    if problems:
        return problems
    records.append(rec)
    if make_key(rec["source"], rec["image_id"]) != key:
        problems.append(f"key does not match source/image_id {rec['source']}/{rec['image_id']}")
    try:
        im = open_checked(group["jpg"])
        if im.format != "JPEG":
            problems.append(f"image is {im.format}, not JPEG")
        if im.mode != "RGB":
            problems.append(f"image mode {im.mode}, not RGB")
        if im.size != (rec["width"], rec["height"]):
            problems.append(f"image is {im.size[0]}x{im.size[1]}, record says {rec['width']}x{rec['height']}")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
    except (HeaderProblem, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        problems.append(f"image does not decode ({e})")
    for i, ref in enumerate(rec.get("refs", [])):
        masks = ([ref["mask"]] if "mask" in ref else []) + list(ref.get("masks") or [])   # generalised refs: masks
        for m in masks:
            try:
                mk = decode_mask(m)
                if mk.shape != (rec["height"], rec["width"]):
                    problems.append(f"refs[{i}]: mask shape {mk.shape}")
            except Exception as e:  # pycocotools raises bare Exceptions on bad counts
                problems.append(f"refs[{i}]: mask does not decode ({e})")
    return problems


def describe(d: Path, samples: int) -> None:
    """Print the manifest's counts and the first ``samples`` records of ``d``."""
    m = read_manifest(d)
    print(f"== {d}  source={m.get('source')}  samples={m.get('samples')}  shards={len(m['shards'])}")
    print("   " + "  ".join(f"{k}={m.get(k)}" for k in COUNT_KEYS))
    for k in ("regions_by_kind", "refs_by_split", "sentences_by_split"):
        if m.get(k):
            print(f"   {k}: {m[k]}")
    print(f"   skipped: {m.get('skipped') or 'none'}   repaired: {m.get('repaired') or 'none'}")
    if m.get("extra"):
        print(f"   extra: {json.dumps(m['extra'], sort_keys=True)[:300]}")
    try:
        _print_samples(d, m, samples)
    except (tarfile.TarError, OSError, KeyError, ValueError) as e:  # --check reports the details
        print(f"   cannot show samples: {e}")


def _print_samples(d: Path, m: dict, samples: int) -> None:
    shown, bad = 0, 0
    for s in m["shards"]:
        if shown >= samples:
            break
        for key, group in iter_tar_samples(shard_path(d, s)):
            if shown >= samples:
                break
            try:
                rec = json.loads(group["json"])
                im = open_checked(group["jpg"])
                refs = rec.get("refs", [])
                lines = [f"   {key}: {im.size[0]}x{im.size[1]} (orig {rec['orig_width']}x{rec['orig_height']}) "
                         f"captions={len(rec.get('captions', []))} regions={len(rec.get('regions', []))} refs={len(refs)}"]
                for c in rec.get("captions", [])[:1]:
                    lines.append(f"      caption: {c!r}")
                for r in rec.get("regions", [])[:2]:
                    lines.append(f"      {r['kind']}: {r['text']!r} {r['bbox']}")
                for r in refs[:2]:
                    area = int(mask_utils.area({"size": r["mask"]["size"], "counts": r["mask"]["counts"].encode()})) \
                        if "mask" in r else None
                    lines.append(f"      ref {r.get('ref_id')} [{r['split']}]: {r['sentences'][0]!r} {r['bbox']} "
                                 f"mask_area={area}")
            except Exception as e:  # noqa: BLE001 - a hostile sample is one counted skip, --check has the details
                bad += 1
                print(f"   {key}: skipped ({type(e).__name__}: {str(e)[:120]})")
                continue
            print("\n".join(lines))
            shown += 1
    if bad:
        print(f"   samples skipped while showing: {bad}")


def inspect_main(root: str | Path, *, check: bool = False, samples: int = 2) -> int:
    """Describe (and with ``check`` verify) every shard directory under ``root``; exit code 1 on problems."""
    dirs = shard_dirs(root)
    bad = 0
    for d in dirs:
        describe(d, samples)
        if check:
            problems = check_dir(d)
            for p in problems:
                print(f"   MISMATCH {p}")
            print(f"   check: {'OK' if not problems else f'{len(problems)} problem(s)'}")
            bad += len(problems)
    return 1 if bad else 0
