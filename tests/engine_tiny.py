"""A tiny task + deterministic synthetic loader driving pretrain.engine.train; run as a script by the engine tests
(`python tests/engine_tiny.py --config X k=v ...` or under torchrun) so real processes can be killed/signalled.

Batches depend only on (seed, epoch, batch index, rank): a resumed run sees exactly the batches the
uninterrupted run saw. ENGINE_TINY_NAN="3,4" makes global batches 3 and 4 of epoch 0 non-finite;
ENGINE_TINY_SLEEP=0.2 slows each step down so a test can signal mid-run. ENGINE_TINY_SIGNAL=WHERE:SIG[:RANK]
makes the process send itself SIG (USR1, TERM) at WHERE: `startup` (before train()), `batchN` (when loading
global batch N), `eval` (inside the final evaluation; ENGINE_TINY_EVAL=1 turns evaluation on) or `export`.
As a program it holds the signals from its first line, like `python -m pretrain`.
"""
from __future__ import annotations

if __name__ == "__main__":
    from pathlib import Path as _Path
    import sys as _sys

    _sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))
    from pretrain.preemption import install

    install()

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.config import PretrainConfig, load_config  # noqa: E402
from pretrain.engine import train  # noqa: E402

DIM, VOCAB, SEQ = 16, 50, 6


class TinyTask(nn.Module):
    """Embedding + MLP with LayerNorm, dropout and a [1]-shaped temperature: every parameter kind the optimizer
    groups distinguish, plus RNG use (dropout) so resume must restore RNG state to match."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.body = nn.Sequential(nn.Linear(2 * DIM, DIM), nn.LayerNorm(DIM), nn.GELU(), nn.Dropout(0.1))
        self.head = nn.Linear(DIM, 1)
        self.temp = nn.Parameter(torch.ones([1]))

    def lr_multipliers(self) -> dict[str, float]:
        return {"head.": 2.0}

    def forward(self, batch: dict) -> dict:
        text = self.embed(batch["tokens"]).mean(1)
        h = self.body(torch.cat([batch["image"], text.to(batch["image"].dtype)], -1))
        pred = self.head(h).squeeze(-1) * self.temp
        mse = ((pred.float() - batch["target"].float()) ** 2).mean()
        return {"loss": mse, "mse": mse.detach()}


def make_batch(seed: int, epoch: int, index: int, rank: int, size: int) -> dict:
    g = torch.Generator().manual_seed(hash((seed, epoch, index, rank)) % (2 ** 31))
    image = torch.randn(size, DIM, generator=g)
    batch = {"image": image, "tokens": torch.randint(0, VOCAB, (size, SEQ), generator=g),
             "target": image[:, 0] * 0.5 + 0.1}
    nan = {int(x) for x in os.environ.get("ENGINE_TINY_NAN", "").split(",") if x}
    if epoch == 0 and index in nan:
        batch["image"] = batch["image"] * float("nan")
    return batch


def export_max_diff(task: nn.Module, cfg, export_dir: str) -> float:
    """Largest |exported - live| over all weights (gathers ZeRO-3 partitions; collective on every rank)."""
    from pretrain.checkpoint import load_consolidated

    exported = load_consolidated(export_dir)
    params = list(task.parameters())
    if cfg.engine.uses_deepspeed and cfg.engine.zero_stage == 3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(params)
    else:
        import contextlib

        ctx = contextlib.nullcontext()
    with ctx:
        live = {k: v.detach().float().cpu().clone() for k, v in task.state_dict().items()}
    assert set(live) == set(exported), (sorted(live), sorted(exported))
    return max(float((live[k] - exported[k].float()).abs().max()) for k in live)


def signal_self(where: str, rank: int) -> None:
    """Send ENGINE_TINY_SIGNAL's signal to this process when `where` matches (once)."""
    spec = os.environ.get("ENGINE_TINY_SIGNAL", "")
    if not spec:
        return
    at, sig, *only = spec.split(":")
    if at == where and (not only or int(only[0]) == rank):
        os.environ["ENGINE_TINY_SIGNAL"] = ""
        os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))
        time.sleep(0.2)                         # delivered by the signal thread meanwhile


def main(argv: list[str]) -> int:
    cfg = load_config(PretrainConfig, argv[0], argv[1:])
    torch.manual_seed(cfg.run.seed)
    task = TinyTask()
    rank = int(os.environ.get("RANK", 0))
    sleep = float(os.environ.get("ENGINE_TINY_SLEEP", "0"))
    signal_self("startup", rank)

    def make_loader(epoch: int, start: int):
        for i in range(start, cfg.data.batches_per_epoch):
            if sleep:
                time.sleep(sleep)
            signal_self(f"batch{epoch * cfg.data.batches_per_epoch + i}", rank)
            yield make_batch(cfg.run.seed, epoch, i, rank, cfg.data.batch_size)

    def evaluate(module: nn.Module, step: int) -> dict:
        if step == cfg.optim.total_steps:
            signal_self("eval", rank)
        return {"score": float(step)}

    from pretrain import checkpoint as ckpt
    export = ckpt.export_consolidated

    def export_signalled(*a, **kw):
        signal_self("export", rank)
        return export(*a, **kw)

    ckpt.export_consolidated = export_signalled
    try:
        summary = train(cfg, task, make_loader, batches_per_epoch=cfg.data.batches_per_epoch,
                        evaluate=evaluate if os.environ.get("ENGINE_TINY_EVAL") else None)
    finally:
        ckpt.export_consolidated = export
    if summary["export"]:
        summary["export_max_diff"] = export_max_diff(task, cfg, summary["export"])
    if rank == 0:
        Path(cfg.run.out_dir, "summary.json").write_text(json.dumps(summary))
    from pretrain.distributed import cleanup
    cleanup(synchronize=True)           # as python -m pretrain does: no rank exits with gloo's threads running
    return 0


if __name__ == "__main__":
    assert sys.argv[1] == "--config"
    sys.exit(main(sys.argv[2:]))
