"""Held-out probe of a pretraining run: the X-VLM objectives on pairs the run never trained on.

    python -m pretrain.probe --run runs/demo/pretrain --source coco=DIR --source vg=DIR [--batches 20]

Loads the run's config.yaml and export (or latest checkpoint), streams the given shard sets through the
run's own loader (same crops, texts and region sub-batches) and runs the task in eval mode without
gradients, averaging what the training step logs: ITM accuracy on each positive pair and its two hard
negatives (drawn from the contrastive similarities, as in training), image->text R@1 within the batch
(chance 1 / batch size), MLM accuracy, and the region box IoU. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KEYS = ("itm_acc", "itc_r1", "mlm_acc", "region_itm_acc", "region_itc_r1", "region_mlm_acc", "region_box_iou",
        "itc", "itm", "mlm")


def probe(run: str | Path, sources: list[dict], batches: int = 20, seed: int = 1) -> dict:
    import torch

    from pretrain.checkpoint import load_consolidated
    from pretrain.config import PretrainConfig, load_config
    from pretrain.task import build_task
    from pretrain.tokenizer import resolve_tokenizer_dir
    from shards.stream import build_pretrain_loader
    from shards.text import build_tokenizer

    run = Path(run)
    cfg = load_config(PretrainConfig, str(run / "config.yaml"), [])
    cfg.data.sources = sources
    cfg.data.num_workers = 0
    tokenizer = build_tokenizer(resolve_tokenizer_dir(cfg))
    task = build_task(cfg, len(tokenizer))
    missing, unexpected = task.load_state_dict(load_consolidated(run), strict=False)
    if missing or unexpected:
        raise ValueError(f"{run}: weights do not fit the config ({len(missing)} missing, {len(unexpected)} unexpected)")
    task.eval()
    torch.manual_seed(seed)
    loader = build_pretrain_loader(cfg.data, tokenizer, rank=0, world_size=1, epoch=0, seed=seed, start_batch=0)
    sums: dict[str, float] = {}
    n = 0
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i >= batches:
                break
            out = task(batch)
            for k in KEYS:
                if k in out:
                    sums[k] = sums.get(k, 0.0) + float(out[k])
            n += 1
    return {"run": str(run), "batches": n, "batch_size": cfg.data.batch_size,
            **{k: v / max(n, 1) for k, v in sums.items()}}


def parse_source(text: str) -> dict:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--source expects NAME=DIR, got {text!r}")
    return {"name": name, "shards": path, "weight": 1.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="pretraining run dir (config.yaml + export/ or checkpoints/)")
    ap.add_argument("--source", type=parse_source, action="append", required=True, metavar="NAME=DIR",
                    help="held-out shard set (repeatable)")
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    from pretrain.config import ConfigError
    from shards.stream import DataError

    try:
        result = probe(args.run, args.source, args.batches, args.seed)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
