"""img2dataset webdataset output (``NNNNN.tar`` + ``.parquet`` + ``_stats.json``) -> caption-only items.

Only ``status == "success"`` samples are used (the tars should hold nothing else). Captions come from the
``.txt`` member (the ``.json`` ``caption`` when there is none); text that is not valid UTF-8 is passed on
with surrogate escapes so the writer drops and counts it. The download failures img2dataset recorded
(``_stats.json``, else the parquet ``status`` column) are reported in the manifest's ``extra`` counts.
"""
from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

from shards.build import Item
from shards.inputs import InputError, is_plain_name, require_dir
from shards.schema import make_key

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SOURCES = ("cc3m", "cc12m", "sbu")


def _download_counts(tar: Path) -> Counter:
    """img2dataset's own per-shard success/failure counts, from the stats JSON or the parquet."""
    stats_file = tar.with_name(tar.stem + "_stats.json")
    c: Counter = Counter()
    if stats_file.is_file():
        try:
            s = json.loads(stats_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(stats_file, f"malformed JSON ({e})") from None
        if not isinstance(s, dict):
            raise InputError(stats_file, "expected a JSON object")
        for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
            v = s.get(k) or 0
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise InputError(stats_file, f"{k} {v!r:.40} is not a count")
            c[k] += v
        return c
    parquet = tar.with_suffix(".parquet")
    if parquet.is_file():
        import pyarrow.parquet as pq
        try:
            status = pq.read_table(parquet, columns=["status"]).column("status").to_pylist()
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise InputError(parquet, f"unreadable parquet ({type(e).__name__}: {e})") from None
        c["count"] += len(status)
        for s in status:
            c["successes" if s == "success" else str(s)] += 1
    return c


def img2dataset_items(input_dir: str | Path, source: str) -> tuple[list[Item], dict, dict]:
    """Items (in tar and member order), skip counts and img2dataset's download counts."""
    if source not in SOURCES:
        raise InputError(source, f"--source must be one of {', '.join(SOURCES)}")
    input_dir = require_dir(input_dir)
    tars = sorted(p for p in input_dir.glob("*.tar") if p.stem.isdigit())
    if not tars:
        raise InputError(input_dir, "no img2dataset NNNNN.tar files")
    items, skips, downloads = [], Counter(), Counter()
    for tar in tars:
        keys_here: set[str] = set()
        downloads.update(_download_counts(tar))
        try:
            with tarfile.open(tar, "r") as tf:
                samples: dict[str, dict[str, tarfile.TarInfo]] = {}
                for m in tf.getmembers():
                    base = m.name.rsplit("/", 1)[-1]
                    if m.isfile() and "." in base:
                        # WebDataset's key: the whole path up to the first dot of the file name, so
                        # sub/dir/000001.jpg and 000001.jpg stay two samples
                        head = m.name[:len(m.name) - len(base)]
                        stem, ext = base.split(".", 1)
                        samples.setdefault(head + stem, {})[ext.lower()] = m
                for key, members in samples.items():
                    img_ext = next((e for e in IMAGE_EXTS if e in members), None)
                    meta: dict = {}
                    if "json" in members:
                        try:
                            meta = json.loads(tf.extractfile(members["json"]).read())
                        except (json.JSONDecodeError, UnicodeDecodeError):
                            skips["metadata_malformed"] += 1
                            continue
                        if not isinstance(meta, dict):
                            skips["metadata_malformed"] += 1
                            continue
                    status = meta.get("status", "success")
                    if not isinstance(status, str) or not is_plain_name(status):
                        skips["metadata_malformed"] += 1
                        continue
                    if status != "success":
                        skips[f"status_{status}"] += 1
                        continue
                    if img_ext is None:
                        skips["image_missing"] += 1
                        continue
                    if "txt" in members:
                        caption = tf.extractfile(members["txt"]).read().decode("utf-8", "surrogateescape")
                    else:
                        caption = meta.get("caption") or ""
                    sample_key = make_key(source, key)
                    if sample_key in keys_here:
                        skips["sample_key_collision"] += 1     # e.g. a/b_1 and a_b/1: both map to one tar-safe key
                        continue
                    keys_here.add(sample_key)
                    rec = {"source": source, "image_id": key, "captions": [caption]}
                    items.append(Item(key=sample_key, image=(str(tar), members[img_ext].name), record=rec))
        except (tarfile.TarError, OSError) as e:
            raise InputError(tar, f"unreadable tar ({e})") from None
    ids = [it.key for it in items]
    if len(set(ids)) != len(ids):
        dup = next(k for k, n in Counter(ids).items() if n > 1)
        raise InputError(input_dir, f"sample key {dup} appears in two tars (mixed img2dataset runs?)")
    return items, dict(skips), {"img2dataset": dict(sorted(downloads.items())), "tars_in": len(tars)}
