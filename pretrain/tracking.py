"""Run tracking on rank 0: tqdm progress bar, metrics.jsonl, and wandb (offline by default).

wandb must never block or fail a run: `init_wandb` bounds the start-up with `init_timeout`, catches every
error (unreachable server, missing API key, bad entity) and falls back to no wandb with one warning line.
`WANDB_MODE` in the environment wins over `run.wandb.mode` (unless that is `disabled`), so a cluster profile
can switch it globally.
metrics.jsonl (one JSON object per logged step) is what the demo report plots.
"""
from __future__ import annotations

import json
import math
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

# Dense peak tensor throughput (FLOP/s) for MFU; unknown devices report no MFU rather than a made-up one.
PEAK_FLOPS = {
    ("H100", "bf16"): 989e12, ("H100", "fp16"): 989e12, ("H100", "fp32"): 67e12,
    ("H200", "bf16"): 989e12, ("H200", "fp16"): 989e12, ("H200", "fp32"): 67e12,
    ("A100", "bf16"): 312e12, ("A100", "fp16"): 312e12, ("A100", "fp32"): 19.5e12,
}


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Per-device peak for MFU; VLP_PEAK_FLOPS overrides (e.g. for an unlisted GPU)."""
    if os.environ.get("VLP_PEAK_FLOPS"):
        return float(os.environ["VLP_PEAK_FLOPS"])
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for (key, prec), flops in PEAK_FLOPS.items():
        if key in name and prec == precision:
            return flops
    return None


def init_wandb(wcfg: Any, run_cfg: dict, out_dir: Path):
    """A wandb run, or None (disabled, or failed: one warning line, the run goes on)."""
    mode = "disabled" if wcfg.mode == "disabled" else (os.environ.get("WANDB_MODE") or wcfg.mode)
    if mode == "disabled":
        return None
    try:
        import wandb

        return wandb.init(project=wcfg.project, entity=wcfg.entity, name=wcfg.name, tags=list(wcfg.tags),
                          config=run_cfg, dir=str(out_dir), mode=mode, resume="allow",
                          id=_wandb_id(out_dir), settings=wandb.Settings(init_timeout=wcfg.init_timeout,
                                                                         silent=True))
    except Exception as e:  # noqa: BLE001 - any wandb failure must not stop training
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"warning: wandb disabled ({mode} init failed: {first})", file=sys.stderr, flush=True)
        return None


def _wandb_id(out_dir: Path) -> str:
    """One wandb run id per out_dir, so a requeued job continues the same wandb run."""
    f = out_dir / "wandb_id"
    if f.is_file():
        return f.read_text().strip()
    rid = uuid.uuid4().hex[:12]
    f.write_text(rid)
    return rid


def _step_of(row: str) -> int | None:
    try:
        obj = json.loads(row)
        step = obj.get("step", 0) if isinstance(obj, dict) else None
        return step if isinstance(step, int) else None
    except ValueError:
        return None


class Tracker:
    """Rank-0 logging sink; on other ranks every method is a no-op."""

    def __init__(self, cfg: Any, out_dir: Path, *, is_main: bool, total_steps: int, start_step: int):
        self.is_main = is_main
        self.out_dir = out_dir
        self.metrics_path = out_dir / "metrics.jsonl"
        self.wandb = None
        self.bar = None
        if not is_main:
            return
        from pretrain.config import to_dict

        self.wandb = init_wandb(cfg.run.wandb, to_dict(cfg), out_dir)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                        disable=not sys.stderr.isatty() and os.environ.get("VLP_PROGRESS") != "1")

    def truncate_after(self, step: int) -> int:
        """Drop metrics rows logged after `step` (a killed run logged steps its checkpoint does not hold; the
        resumed run logs them again). Returns the number of rows dropped."""
        if not self.is_main or not self.metrics_path.is_file():
            return 0
        rows = self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines()
        keep = [r for r in rows if _step_of(r) is not None and _step_of(r) <= step]   # a torn last line goes too
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(r + "\n" for r in keep))
        os.replace(tmp, self.metrics_path)
        return len(rows) - len(keep)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.is_main:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.bar is not None:
            show = {k: record[k] for k in ("loss", "lr", "samples_per_s_gpu", "data_time", "mfu") if k in record
                    and record[k] is not None}
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in show.items()}, refresh=False)
            if self.bar.disable:            # no tty (SLURM log): one plain line per log step
                print(" ".join(f"{k}={_fmt(v)}" for k, v in record.items()), flush=True)
        if self.wandb is not None:
            try:
                self.wandb.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=step)
            except Exception as e:  # noqa: BLE001
                print(f"warning: wandb logging failed, disabling it ({e})", file=sys.stderr, flush=True)
                self.wandb = None
                _teardown_wandb()

    def message(self, text: str) -> None:
        if self.is_main:
            (tqdm.write if self.bar is not None and not self.bar.disable else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except (Exception, SystemExit):  # noqa: BLE001 - wandb exits when its service died (SIGTERM)
                _teardown_wandb()
            self.wandb = None


def _teardown_wandb() -> None:
    """Release wandb after its service process died (it exits on SIGTERM, which SLURM sends to every process of
    the step): without this its atexit hook prints a traceback, and `finish()` calls sys.exit with the
    service's exit status."""
    try:
        import wandb

        wandb.teardown()
    except (Exception, SystemExit):  # noqa: BLE001
        pass


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)                        # JSON has no nan/inf
    return v


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
