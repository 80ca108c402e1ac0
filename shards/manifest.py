"""manifest.json: what a shard directory holds, written atomically once every shard is complete.

Per-shard statistics are kept in ``<out>/.build/shard-XXXXXX.json`` while building; they make a rerun
after a kill skip finished shards, and the manifest is their sum. Nothing time- or machine-dependent is
recorded, so an interrupted-and-resumed build and an uninterrupted one write the same manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from shards.inputs import InputError
from shards.schema import MANIFEST, SCHEMA_VERSION

STATS_DIR = ".build"
SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*\.tar")    # a plain file name: no '/', never '..' alone
COUNT_KEYS = ("captions", "regions", "refs", "sentences")


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and ``os.replace`` (readers never see half a file)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def read_manifest(shard_dir: str | Path) -> dict:
    """The manifest of ``shard_dir``; InputError when it is missing or malformed. Every shard entry is checked:
    a plain file name inside ``shard_dir`` (no folder part, no ``..``), a sample count and a sha256."""
    p = Path(shard_dir) / MANIFEST
    if not p.is_file():
        raise InputError(p, "no such file (not a finished shard directory?)")
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(p, f"malformed manifest JSON ({str(e)[:200]})") from None
    except OSError as e:
        raise InputError(p, f"unreadable ({e.strerror})") from None
    if not isinstance(m, dict) or not isinstance(m.get("shards"), list):
        raise InputError(p, "not a shard manifest (no 'shards' list)")
    for i, s in enumerate(m["shards"]):
        problem = shard_entry_problem(s)
        if problem:
            raise InputError(p, f"shards[{i}]: {problem}")
    return m


def shard_entry_problem(s: Any) -> str | None:
    """Why a manifest ``shards`` entry cannot be used, or None (``samples`` and ``sha256`` may be absent;
    ``inspect --check`` reports that)."""
    if not isinstance(s, dict):
        return "not an object"
    name = s.get("name")
    if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
        return f"name {name!r} is not a plain shard file name (expected e.g. shard-000000.tar)"
    n = s.get("samples", 0)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        return f"samples {n!r} is not a count"
    sha = s.get("sha256", "0" * 64)
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        return f"sha256 {sha!r} is not a hex digest"
    return None


def shard_path(shard_dir: str | Path, entry: dict) -> Path:
    """The file of a checked manifest entry: always directly inside ``shard_dir``."""
    return Path(shard_dir) / Path(entry["name"]).name


def sample_counts(records: Iterable[dict]) -> dict:
    """Counts of captions, regions (by kind), refs and sentences (by split) in schema records."""
    c: Counter = Counter()
    by_kind: Counter = Counter()
    refs_split: Counter = Counter()
    sents_split: Counter = Counter()
    for r in records:
        c["captions"] += len(r.get("captions", []))
        c["regions"] += len(r.get("regions", []))
        by_kind.update(g["kind"] for g in r.get("regions", []))
        for ref in r.get("refs", []):
            c["refs"] += 1
            c["sentences"] += len(ref["sentences"])
            refs_split[ref["split"]] += 1
            sents_split[ref["split"]] += len(ref["sentences"])
    out = {k: c[k] for k in COUNT_KEYS}
    out["regions_by_kind"] = dict(sorted(by_kind.items()))
    out["refs_by_split"] = dict(sorted(refs_split.items()))
    out["sentences_by_split"] = dict(sorted(sents_split.items()))
    return out


def _add_counts(total: dict, part: dict) -> None:
    for k, v in part.items():
        if isinstance(v, dict):
            sub = total.setdefault(k, {})
            for kk, vv in v.items():
                sub[kk] = sub.get(kk, 0) + vv
        else:
            total[k] = total.get(k, 0) + v


def assemble(shard_stats: list[dict], *, source: str, args: dict, settings: dict,
             extra_skips: dict | None, extra_counts: dict | None, items: int) -> dict:
    """Sum per-shard statistics (in shard order) into the manifest dict."""
    counts: dict = {"captions": 0, "regions": 0, "refs": 0, "sentences": 0,
                    "regions_by_kind": {}, "refs_by_split": {}, "sentences_by_split": {}}
    skipped: Counter = Counter(extra_skips or {})
    repaired: Counter = Counter()
    for s in shard_stats:
        _add_counts(counts, s["counts"])
        skipped.update(s["skipped"])
        repaired.update(s["repaired"])
    for k in ("regions_by_kind", "refs_by_split", "sentences_by_split"):
        counts[k] = dict(sorted(counts[k].items()))
    return {
        "schema": SCHEMA_VERSION,
        "source": source,
        "args": args,
        "settings": settings,
        "items_in": items,
        "samples": sum(s["samples"] for s in shard_stats),
        **counts,
        "shards": [{"name": s["name"], "samples": s["samples"], "sha256": s["sha256"], "bytes": s["bytes"]}
                   for s in shard_stats],
        "skipped": dict(sorted(skipped.items())),
        "repaired": dict(sorted(repaired.items())),
        "extra": extra_counts or {},
    }
