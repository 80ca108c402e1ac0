"""The demo's data stage: synthetic raw datasets -> every shard set, through the real command lines.

``build_demo_shards(out)`` writes ``out/raw/`` (shards.synthetic) and ``out/shards/<source>/`` (coco and
vg with the RefCOCO exclusion, cc3m from the img2dataset output, objects365, and refcoco per split), by
running exactly the ``python -m shards ...`` commands a user would, as child processes. The end-to-end demo
(finetune.demo) calls it; ``python -m shards demo --out DIR`` runs it alone and adds ``DIR/tokenizer``
(the vocabulary the smoke configs read).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from shards.inspect import iter_tar_samples, shard_dirs
from shards.manifest import read_manifest


# Small shards so that the demo's sets split over 2 ranks x 2 loader workers like real ones do.
DEMO_SAMPLES_PER_SHARD = 50


def demo_commands(raw: Path, shards: Path, workers: int) -> list[list[str]]:
    """The converter command lines (argv after ``python -m shards``) that build the demo's shard sets."""
    coco, vg, o365, refer = raw / "coco", raw / "vg", raw / "objects365", raw / "refer"
    common = ["--workers", str(workers), "--samples-per-shard", str(DEMO_SAMPLES_PER_SHARD)]
    return [
        ["coco", "--images", f"{coco}/train2017", "--captions", f"{coco}/annotations/captions_train2017.json",
         "--instances", f"{coco}/annotations/instances_train2017.json", "--exclude-refer", str(refer),
         "--out", f"{shards}/coco", *common],
        ["vg", "--images", str(vg), "--image-data", f"{vg}/image_data.json", "--regions",
         f"{vg}/region_descriptions.json", "--objects", f"{vg}/objects.json", "--exclude-refer", str(refer),
         "--out", f"{shards}/vg", *common],
        ["img2dataset", "--input", f"{raw}/cc3m", "--source", "cc3m", "--out", f"{shards}/cc3m", *common],
        ["objects365", "--images", str(o365), "--annotations", f"{o365}/zhiyuan_objv2_train.json",
         "--out", f"{shards}/objects365", *common],
        ["refcoco", "--refer-root", str(refer), "--dataset", "refcoco", "--split-by", "unc",
         "--images", f"{refer}/images/train2014", "--out", f"{shards}/refcoco", *common],
    ]


def run_shards_command(argv: list[str]) -> None:
    """`python -m shards ARGV` as a user runs it, in a child process of this interpreter and this copy of the
    package (the CLI is not imported here: shards.__main__ imports this module for its `demo` command)."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    r = subprocess.run([sys.executable, "-m", "shards", *argv], env=env)
    if r.returncode != 0:
        raise RuntimeError(f"python -m shards {' '.join(argv)} exited with {r.returncode}")


def build_demo_shards(out: Path, seed: int = 0, images: int | None = None, workers: int = 2) -> dict[str, dict]:
    """Generate the raw data and build all shard sets; returns the manifests keyed by each set's path
    under ``out/shards`` ("coco", "vg", "cc3m", "objects365", "refcoco/<split>")."""
    from shards.synthetic import generate

    out = Path(out)
    raw, shards = out / "raw", out / "shards"
    t0 = time.perf_counter()
    print(f"[shards demo] drawing the synthetic raw datasets into {raw}", flush=True)
    generate(raw, seed=seed, images=images)
    manifests: dict[str, dict] = {}
    for argv in demo_commands(raw, shards, workers):
        t = time.perf_counter()
        print(f"[shards demo] python -m shards {' '.join(argv)}", flush=True)
        run_shards_command(argv)
        dest = Path(argv[argv.index("--out") + 1])
        for d in shard_dirs(dest):
            manifests[d.relative_to(shards).as_posix()] = read_manifest(d)
        print(f"[shards demo]   done in {time.perf_counter() - t:.1f}s", flush=True)
    print(f"[shards demo] {len(manifests)} shard sets under {shards} in {time.perf_counter() - t0:.1f}s", flush=True)
    return manifests


def shard_texts(root: Path) -> list[str]:
    """Every caption, region text and ref sentence in the shard sets under ``root``, in shard order."""
    import json

    texts: list[str] = []
    for d in sorted(p.parent for p in Path(root).rglob("manifest.json")):
        for s in read_manifest(d)["shards"]:
            for _, group in iter_tar_samples(d / s["name"]):
                rec = json.loads(group["json"])
                texts += rec.get("captions", [])
                texts += [r["text"] for r in rec.get("regions", [])]
                texts += [t for ref in rec.get("refs", []) for t in ref["sentences"]]
    return texts


def build_demo_tokenizer(out: Path) -> Path:
    """A small WordPiece tokenizer (shards.text.build_vocab_tokenizer) over every text in ``out/shards``,
    written to ``out/tokenizer``: the synthetic vocabulary, offline, nothing ever [UNK]."""
    from shards.text import build_vocab_tokenizer

    tok_dir = Path(out) / "tokenizer"
    texts = shard_texts(Path(out) / "shards")
    build_vocab_tokenizer(texts, tok_dir)
    print(f"[shards demo] tokenizer from {len(texts)} texts -> {tok_dir}", flush=True)
    return tok_dir
