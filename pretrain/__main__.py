"""`python -m pretrain --config configs/pretrain/<name>.yaml [dotted.key=value ...]`

Works the same under `srun` (one task per GPU), `torchrun --nproc_per_node N` and as a single process.
User mistakes (missing/malformed config, unknown key, wrong type, missing shards or tokenizer) print one
`error: ...` line and exit with code 2; a diverged run (too many non-finite losses) exits with 1; a
preempted run exits with `run.requeue_exit_code` after saving (the sbatch script requeues on it).
"""
from __future__ import annotations

if __name__ == "__main__":      # as a program: hold SLURM's USR1/TERM before any thread, worker or helper starts
    from pretrain.preemption import install

    install()

import argparse
import json
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pretrain", description="X-VLM multi-grained pretraining.")
    p.add_argument("--config", required=True, help="YAML config (configs/pretrain/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=2e-4 data.batch_size=64")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pretrain.config import ConfigError, PretrainConfig, load_config

    try:
        cfg = load_config(PretrainConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from shards.inputs import InputError, writable_dir
    from shards.stream import DataError, parse_sources

    try:
        writable_dir(cfg.run.out_dir, "run.out_dir")
        parse_sources(cfg.data.sources)              # fail fast on missing shard paths, on every rank
        from pretrain.tokenizer import resolve_tokenizer_dir
        from shards.text import build_tokenizer

        tokenizer = build_tokenizer(resolve_tokenizer_dir(cfg))
    except (DataError, FileNotFoundError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import torch

    from pretrain.distributed import cleanup, discover
    from pretrain.engine import TrainingDiverged, train
    from pretrain.task import build_task
    from shards.stream import build_pretrain_loader

    torch.manual_seed(cfg.run.seed)                  # identical initial weights on every rank
    try:
        task = build_task(cfg, len(tokenizer))
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = discover()

    def make_loader(epoch: int, start_batch: int):
        return build_pretrain_loader(cfg.data, tokenizer, rank=info.rank, world_size=info.world_size,
                                     epoch=epoch, seed=cfg.run.seed, start_batch=start_batch)

    try:
        summary = train(cfg, task, make_loader, batches_per_epoch=cfg.data.batches_per_epoch,
                        samples_per_batch=lambda b: int(b["image"].shape[0]) if "image" in b else 1)
        cleanup(synchronize=True)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ConfigError, DataError, FileNotFoundError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:                        # an unwritable run.out_dir, a full disk: one line, not a traceback
        print(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup()                               # a no-op after the synchronised leave above
    if info.rank == 0:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
