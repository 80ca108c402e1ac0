"""Drives pretrain.engine.train on the real GroundingTask (tiny VG-LAW, deterministic synthetic batches) with
config overrides; run as a script by tests/test_grounding_options.py so DeepSpeed runs in its own process.

    python tests/grounding_options_run.py OUT_DIR key=value ...

Writes OUT_DIR/final.pt: the task's state dict after the run (ZeRO-3 parameters gathered), EMA buffers included.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from finetune.task import build_task  # noqa: E402
from finetune_helpers import TINY, tiny_batch  # noqa: E402
from pretrain.config import apply_overrides, from_dict  # noqa: E402
from pretrain.engine import train  # noqa: E402

BATCHES_PER_EPOCH = 3


def main(out_dir: str, overrides: list[str]) -> None:
    import copy

    data = copy.deepcopy(TINY)
    data["optim"] = {"lr": 1e-3, "warmup_steps": 0, "total_steps": 4, "schedule": "constant"}
    data["run"] = {"out_dir": out_dir, "log_every": 1, "save_every": 1, "keep_checkpoints": 10, "export": False,
                   "resume": "latest", "wandb": {"mode": "disabled"}}
    from finetune.config import FinetuneConfig

    cfg = from_dict(FinetuneConfig, apply_overrides(data, overrides))
    torch.manual_seed(cfg.run.seed)
    task = build_task(cfg)

    def make_loader(epoch: int, start: int):
        for i in range(start, BATCHES_PER_EPOCH):
            yield tiny_batch(cfg.data.batch_size, seed=1000 * epoch + i)

    train(cfg, task, make_loader, batches_per_epoch=BATCHES_PER_EPOCH)
    params = list(task.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(params)
    else:
        import contextlib

        ctx = contextlib.nullcontext()
    with ctx:
        state = {k: v.detach().float().cpu().clone() for k, v in task.state_dict().items()}
    torch.save(state, Path(out_dir) / "final.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
