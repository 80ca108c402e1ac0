"""Fine-tune VG-LAW (+ Mask Grounding) on RefCOCO-family shards with the shared engine.

    python -m finetune --config configs/finetune/refcoco.yaml [dotted.key=value ...]
    torchrun --nproc_per_node 8 -m finetune --config configs/finetune/refcoco.yaml

`init_from` names a pretraining run (its export, a .safetensors file or a DeepSpeed checkpoint dir); its
config.yaml fixes the ViT/BERT architecture. `init_from: null` trains from the config's own initialisation
(ablations). At the end every split in `eval.splits` is evaluated and written to <out_dir>/eval.json as
{split: <evaluate result>}; the export in <out_dir>/export is what `finetune.evaluate` / `.predict` load.
"""
from __future__ import annotations

if __name__ == "__main__":      # as a program: hold SLURM's USR1/TERM before any thread, worker or helper starts
    from pretrain.preemption import install

    install()

import argparse
import json
import sys
from pathlib import Path

from finetune.checkpoint import adopt_pretrained_architecture, load_pretrained
from finetune.config import FinetuneConfig
from finetune.evaluate import evaluate_model, split_dir
from pretrain.config import ConfigError, load_config
from shards.inputs import InputError, writable_dir
from shards.stream import DataError


def flat_metrics(results: dict[str, dict]) -> dict[str, float]:
    """{split: evaluate result} -> {"val/rec_prec@0.5": ..., "val/miou": ...} for the logger."""
    out = {}
    for split, r in results.items():
        out[f"{split}/rec_prec@0.5"] = r["rec"]["prec@0.5"]
        for k, v in r.get("res", {}).items():
            out[f"{split}/{k}"] = v
        for k, v in (r.get("grefcoco") or {}).items():     # splits with several targets or none
            if v is not None:
                out[f"{split}/grefcoco_{k}"] = v
    return out


def prepare(cfg: FinetuneConfig):
    """Everything that can fail on a user mistake, before any process group or model exists."""
    from pretrain.tokenizer import resolve_tokenizer_dir
    from shards.text import build_tokenizer

    writable_dir(cfg.run.out_dir, "run.out_dir")
    cfg = adopt_pretrained_architecture(cfg)
    tokenizer = build_tokenizer(resolve_tokenizer_dir(cfg))
    train_dir = split_dir(cfg.data.shards, cfg.data.train_split)
    eval_dirs = {s: split_dir(cfg.data.shards, s) for s in cfg.eval.splits}
    return cfg, tokenizer, train_dir, eval_dirs


def run(cfg: FinetuneConfig) -> dict:
    from finetune.task import build_task
    from pretrain import distributed as du
    from pretrain.engine import train
    from shards.index import GroundingDataset, build_grounding_loader

    import torch

    cfg, tokenizer, train_dir, eval_dirs = prepare(cfg)
    torch.manual_seed(cfg.run.seed)             # identical initial weights on every rank
    task = build_task(cfg, tokenizer)
    if cfg.init_from:
        loaded = load_pretrained(task.model, cfg.init_from, cfg.init_parts, cfg.init_shrink)
        print(f"[finetune] init_from {cfg.init_from}: " + ", ".join(f"{k} {n} tensors" for k, n in loaded.items()),
              flush=True)
    info = du.discover()
    d = cfg.data
    max_targets = cfg.model.mdetr.queries if cfg.model.head == "mdetr" else 0     # every target, for matching
    dataset = GroundingDataset(str(train_dir), tokenizer, train=True, image_size=d.image_size, max_len=d.max_len,
                               seed=cfg.run.seed, max_targets=max_targets, context_refs=d.context_refs,
                               context_per_object=d.context_per_object)
    skipped = {k: v for k, v in sorted(dataset.skips.items()) if v}
    if skipped and info.rank == 0:      # e.g. no-target expressions a one-instance head cannot train on
        print(f"{train_dir}: {len(dataset)} training expressions; skipped: "
              + ", ".join(f"{k}={v}" for k, v in skipped.items()), file=sys.stderr, flush=True)
    batches = d.batches_per_epoch or max(1, len(dataset) // (d.batch_size * info.world_size))

    def make_loader(epoch: int, start_batch: int):
        return build_grounding_loader(dataset, batch_size=d.batch_size, num_workers=d.num_workers, train=True,
                                      epoch=epoch, start_batch=start_batch, rank=info.rank,
                                      world_size=info.world_size, seed=cfg.run.seed, paired=d.paired)

    results: dict[str, dict] = {}

    def evaluate(module, step: int) -> dict:
        device = next(module.parameters()).device
        for split, path in eval_dirs.items():
            dump = None
            if cfg.eval.dump:   # the final evaluation in eval/, earlier ones (run.eval_every) in eval/step<N>/
                sub = "" if step >= cfg.optim.total_steps else f"step{step:06d}"
                dump = Path(cfg.run.out_dir) / "eval" / sub / f"{split}.jsonl"
            results[split] = evaluate_model(module, path, tokenizer, batch_size=cfg.eval.batch_size,
                                            device=device, rank=info.rank, world_size=info.world_size,
                                            image_size=d.image_size, max_len=d.max_len, dump=dump)
        return flat_metrics(results)

    summary = train(cfg, task, make_loader, batches_per_epoch=batches, evaluate=evaluate if eval_dirs else None)
    summary["results"] = dict(results)
    if info.rank == 0 and results:
        out = Path(cfg.run.out_dir) / "eval.json"
        out.write_text(json.dumps(results, indent=2) + "\n")
    summary["rank"] = info.rank
    du.cleanup(synchronize=True)                # every rank leaves the process group before exit
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m finetune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="configs/finetune/<name>.yaml")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(FinetuneConfig, args.config, args.overrides)
        prepare(cfg)                            # fail fast, with one line, on bad paths
    except (ConfigError, DataError, FileNotFoundError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pretrain.distributed import cleanup
    from pretrain.engine import TrainingDiverged
    try:
        summary = run(cfg)
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
        cleanup()                               # on an error path too (a no-op after run's own leave)
    from finetune.metrics import format_table
    if summary.pop("rank") == 0:
        if summary.get("results"):
            print(format_table(summary["results"]))
        print(json.dumps({k: v for k, v in summary.items() if k != "results"}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
