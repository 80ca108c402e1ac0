"""``python -m shards <command>``: the converters, the synthetic data generator, inspect and the demo.

User mistakes (missing or malformed input files) print one line ``error: <file>: <problem>`` and exit
with code 2; ``inspect --check`` exits with 1 when a shard does not match its manifest.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shards.inputs import InputError

PRETRAIN_MAX_SIDE = 640
EXCLUDED_IDS_FILE = "excluded_refer_ids.json"  # the exclusion set, sorted, beside the coco/vg manifest


def _common(p: argparse.ArgumentParser, max_side: int | None) -> None:
    p.add_argument("--out", required=True, type=Path, help="output directory (rerun the same command to resume)")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes (output does not depend on it)")
    p.add_argument("--max-side", type=int, default=max_side,
                   help=f"longer image side after re-encoding; 0 keeps full size (default: {max_side or 'full size'})")
    p.add_argument("--samples-per-shard", type=int, default=1000)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m shards", description=(
        "Raw datasets -> WebDataset shards of one schema: converters, synthetic raw data, inspect, demo."))
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("coco", help="COCO captions (+ instances) -> captions + object regions")
    p.add_argument("--images", required=True, type=Path, help="train2017/ (or train2014/) image folder")
    p.add_argument("--captions", required=True, type=Path, help="captions_*.json")
    p.add_argument("--instances", type=Path, help="instances_*.json (object regions; optional)")
    p.add_argument("--exclude-refer", type=Path, metavar="ROOT", help="refer root: drop RefCOCO/+/g val/test images")
    _common(p, PRETRAIN_MAX_SIDE)

    p = sub.add_parser("vg", help="Visual Genome regions (+ objects) -> regions")
    p.add_argument("--images", required=True, type=Path, help="folder holding VG_100K/ and VG_100K_2/ (or the images)")
    p.add_argument("--image-data", required=True, type=Path, help="image_data.json")
    p.add_argument("--regions", required=True, type=Path, help="region_descriptions.json")
    p.add_argument("--objects", type=Path, help="objects.json (attributes prepended when present)")
    p.add_argument("--exclude-refer", type=Path, metavar="ROOT", help="refer root: drop images whose coco_id is in RefCOCO/+/g val/test")
    _common(p, PRETRAIN_MAX_SIDE)

    p = sub.add_parser("img2dataset", help="re-shard img2dataset webdataset output (CC3M, CC12M, SBU)")
    p.add_argument("--input", required=True, type=Path, help="img2dataset output folder (NNNNN.tar, .parquet, _stats.json)")
    p.add_argument("--source", required=True, choices=("cc3m", "cc12m", "sbu"))
    _common(p, PRETRAIN_MAX_SIDE)

    p = sub.add_parser("objects365", help="Objects365 (COCO-like JSON) -> object regions")
    p.add_argument("--images", required=True, type=Path, help="folder holding patchN/ (or all images flat)")
    p.add_argument("--annotations", required=True, type=Path, help="zhiyuan_objv2_train.json / objects365_train.json")
    _common(p, PRETRAIN_MAX_SIDE)

    p = sub.add_parser("refcoco", help="RefCOCO/+/g, RefCLEF or gRefCOCO -> one shard directory per split")
    p.add_argument("--refer-root", required=True, type=Path, help="folder holding refcoco/, refcoco+/, refcocog/, refclef/ (grefcoco/)")
    p.add_argument("--dataset", required=True, choices=("refcoco", "refcoco+", "refcocog", "refclef", "grefcoco"),
                   help="grefcoco reads grefcoco/grefs(unc).json: refs with several targets or none")
    p.add_argument("--split-by", required=True, choices=("unc", "google", "umd", "berkeley"))
    p.add_argument("--images", required=True, type=Path, help="COCO train2014/ (or the saiapr_tc-12 folder for refclef)")
    p.add_argument("--safe-train", action="store_true",
                   help="drop train refs on images of any RefCOCO/+/g val/test split under --refer-root (MDETR's rule)")
    _common(p, None)

    p = sub.add_parser("synthetic", help="draw the small synthetic raw datasets in the real raw formats")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=None, help="number of COCO-style images (default: the small demo size)")

    p = sub.add_parser("inspect", help="counts and a few samples; --check verifies every shard against the manifest")
    p.add_argument("dir", type=Path, help="a shard directory, or a grounding root with one directory per split")
    p.add_argument("--check", action="store_true", help="re-hash and decode everything; exit 1 on any mismatch")
    p.add_argument("--samples", type=int, default=2, help="decoded samples to print per directory")

    p = sub.add_parser("demo", help="synthetic raw data + every shard set + a vocabulary: OUT/raw, OUT/shards, OUT/tokenizer")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=None)
    p.add_argument("--workers", type=int, default=2)
    return ap


def recorded_args(ns: argparse.Namespace) -> dict:
    """The arguments that determine the output, as JSON (``workers`` does not, so it is left out)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(ns).items())
            if k not in ("workers", "func")}


def exclusion(root: Path | None) -> tuple[set[int], dict]:
    """RefCOCO/+/g non-train image ids under ``root`` and their provenance (empty when no root)."""
    if root is None:
        return set(), {}
    from shards.refer import excluded_image_ids
    ids, provenance = excluded_image_ids(root)
    return ids, {"root": str(root), "images": len(ids), **provenance}


def run(ns: argparse.Namespace) -> int:
    """Execute one parsed command; returns the exit code."""
    from shards.build import build_shards

    if ns.command == "inspect":
        from shards.inspect import inspect_main
        return inspect_main(ns.dir, check=ns.check, samples=ns.samples)
    if ns.command == "synthetic":
        from shards.synthetic import generate
        summary = generate(ns.out, seed=ns.seed, images=ns.images)
        print(json.dumps(summary, sort_keys=True))
        return 0
    if ns.command == "demo":
        from shards.demo import build_demo_shards, build_demo_tokenizer
        manifests = build_demo_shards(ns.out, seed=ns.seed, images=ns.images, workers=ns.workers)
        build_demo_tokenizer(ns.out)            # OUT/tokenizer: what the smoke configs read
        print(json.dumps({k: m["samples"] for k, m in manifests.items()}, sort_keys=True))
        return 0

    if ns.samples_per_shard < 1 or ns.workers < 1 or (ns.max_side is not None and ns.max_side < 0):
        raise InputError("arguments", "--samples-per-shard and --workers must be >= 1, --max-side >= 0")
    max_side = ns.max_side or None
    common = dict(args=recorded_args(ns), workers=ns.workers, samples_per_shard=ns.samples_per_shard,
                  max_side=max_side)
    if ns.command == "refcoco":
        from shards.refer import refcoco_items
        exclude, prov = exclusion(ns.refer_root) if ns.safe_train else (set(), {})
        by_split, skips, counts = refcoco_items(ns.refer_root, ns.dataset, ns.split_by, ns.images,
                                                exclude_ids=exclude or None)
        for split, items in sorted(by_split.items()):
            extra = {**counts.get(split, {}), **({"safe_train": prov} if prov else {})}
            m = build_shards(items, ns.out / split, source=ns.dataset, extra_skips=skips.get(split),
                             extra_counts=extra, **common)
            _report(ns.out / split, m)
        return 0

    if ns.command == "coco":
        from shards.coco import coco_items
        exclude, prov = exclusion(ns.exclude_refer)
        items, skips, extra = coco_items(ns.images, ns.captions, ns.instances, exclude)
        source = "coco"
    elif ns.command == "vg":
        from shards.vg import vg_items
        exclude, prov = exclusion(ns.exclude_refer)
        items, skips, extra = vg_items(ns.images, ns.image_data, ns.regions, ns.objects, exclude)
        source = "vg"
    elif ns.command == "img2dataset":
        from shards.img2dataset import img2dataset_items
        items, skips, extra = img2dataset_items(ns.input, ns.source)
        source, prov = ns.source, {}
    else:
        from shards.objects365 import objects365_items
        items, skips, extra = objects365_items(ns.images, ns.annotations)
        source, prov = "objects365", {}
    if prov:
        from shards.refer import save_exclusion
        extra["exclude_refer"] = {**prov, "ids_file": EXCLUDED_IDS_FILE}
        ns.out.mkdir(parents=True, exist_ok=True)
        save_exclusion(ns.out / EXCLUDED_IDS_FILE, exclude, prov)
    m = build_shards(items, ns.out, source=source, extra_skips=skips, extra_counts=extra, **common)
    _report(ns.out, m)
    return 0


def _report(out: Path, m: dict) -> None:
    skipped = ", ".join(f"{k}={v}" for k, v in m["skipped"].items()) or "none"
    print(f"{out}: {m['samples']} samples in {len(m['shards'])} shards "
          f"(captions {m['captions']}, regions {m['regions']}, refs {m['refs']}); skipped: {skipped}")


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return run(ns)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:   # missing, unreadable or unwritable paths (read-only --out, a file where a folder goes)
        print(f"error: {e.filename or e.filename2 or 'path'}: {e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
