"""The training loop shared by pretraining and fine-tuning (one loop; only the task module differs).

    summary = train(cfg, task, make_loader, batches_per_epoch=1000)

`task(batch)` returns a dict with a scalar "loss" and other scalar terms to log; a task method
`on_optimizer_step()`, if present, runs after every optimizer step (an EMA model's update). The loop runs DeepSpeed
(ZeRO 0-3, bf16/fp32, offload) or, with `engine.backend: ddp`, the same loop on the PyTorch engine (plain in one
process, DistributedDataParallel over several); `engine.compile` compiles the task inside either (pretrain.compile).
It counts optimizer steps up to `optim.total_steps`; the epoch advances after `batches_per_epoch` batches
per rank, and `make_loader(epoch, start_batch)` lets a resumed run continue the same data order. A
non-finite loss skips that batch on every rank (no backward, no optimizer step) and stops the run after
`run.max_nan_steps` in a row. SIGUSR1/SIGTERM (pretrain.preemption) -> finish the step, save, exit with
`run.requeue_exit_code` on every rank; before the first step nothing is saved; during the final evaluation the
requeued job evaluates again; during the export the run completes.
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from pretrain import checkpoint as ckpt
from pretrain import distributed as du
from pretrain.config import save_config
from pretrain.ds_config import BatchPlan, build_ds_config, plan_batch
from pretrain.optim import build_optimizer, build_scheduler
from pretrain.preemption import PreemptionFlag
from pretrain.tracking import Tracker, peak_flops


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row."""


def micro_batch_size(cfg: Any) -> int:
    data = getattr(cfg, "data", None)
    return int(getattr(data, "batch_size", 1) or 1)


def default_samples(batch: dict) -> int:
    """Leading dimension of the first tensor in the batch (images usually come first)."""
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.ndim > 0:
            return int(v.shape[0])
    return 1


def to_device(batch: Any, device: torch.device, float_dtype: torch.dtype | None) -> Any:
    """Move tensors to `device` (non-blocking); cast floating tensors to `float_dtype` (bf16 engines do not
    autocast). Nested dicts/lists are walked; everything else passes through."""
    if isinstance(batch, torch.Tensor):
        t = batch.to(device, non_blocking=True)
        return t.to(float_dtype) if float_dtype is not None and t.is_floating_point() else t
    if isinstance(batch, dict):
        return {k: to_device(v, device, float_dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, float_dtype) for v in batch)
    return batch


class _Data:
    """Epoch/position bookkeeping over make_loader(epoch, start_batch)."""

    def __init__(self, make_loader: Callable[[int, int], Iterable[dict]], batches_per_epoch: int, epoch: int,
                 batch_in_epoch: int):
        self.make_loader = make_loader
        self.batches_per_epoch = batches_per_epoch
        self.epoch = epoch
        self.batch_in_epoch = batch_in_epoch
        self.short_epochs = 0
        self._it: Iterator[dict] | None = None
        self._loader: Any = None
        self._done_skips: Counter = Counter()       # skips of finished epochs (this process, since start/resume)

    def next(self) -> dict:
        for _ in range(3):
            if self.batch_in_epoch >= self.batches_per_epoch:
                self._next_epoch()
            if self._it is None:
                self._loader = self.make_loader(self.epoch, self.batch_in_epoch)
                self._it = iter(self._loader)
            try:
                batch = next(self._it)
            except StopIteration:           # loader shorter than batches_per_epoch: count it, move on
                self.short_epochs += 1
                self._next_epoch()
                continue
            self.batch_in_epoch += 1
            return batch
        raise RuntimeError("the data loader yields no batches")

    def _next_epoch(self) -> None:
        self._done_skips += self._loader_skips()
        self._loader = None
        self.epoch += 1
        self.batch_in_epoch = 0
        self._it = None

    def _loader_skips(self) -> Counter:
        skips = getattr(self._loader, "skips", None)
        return Counter({str(k): int(v) for k, v in dict(skips).items()}) if skips else Counter()

    def skips(self) -> dict[str, int]:
        """Samples the loaders skipped so far, by reason, summed over ranks (collective when distributed)."""
        mine = self._done_skips + self._loader_skips()
        if du.is_dist():
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, dict(mine))
            mine = sum((Counter(p) for p in parts), Counter())
        return dict(sorted(mine.items()))


def _build_engine(cfg: Any, task: nn.Module, device: torch.device, plan: BatchPlan):
    if cfg.engine.activation_checkpointing and hasattr(task, "set_grad_checkpointing"):
        task.set_grad_checkpointing(True)
    engine = _build_torch_engine(cfg, task, device, plan) if not cfg.engine.uses_deepspeed else \
        _build_deepspeed_engine(cfg, task, device, plan)
    if cfg.engine.compile:
        from pretrain.compile import compile_engine

        compile_engine(engine, cfg.engine)
    return engine


def _build_torch_engine(cfg: Any, task: nn.Module, device: torch.device, plan: BatchPlan):
    from pretrain.plain_engine import PlainEngine

    task.to(device)
    opt = build_optimizer(task, cfg.optim, device)
    return PlainEngine(task, opt, build_scheduler(opt, cfg.optim), grad_accum=plan.accum,
                       grad_clip=cfg.optim.grad_clip, precision=cfg.engine.precision, device=device,
                       ddp=plan.world > 1)


def _build_deepspeed_engine(cfg: Any, task: nn.Module, device: torch.device, plan: BatchPlan):
    du.prepare_deepspeed_env()
    import logging

    import deepspeed

    if not du.discover().is_main:           # DeepSpeed logs INFO per rank; keep rank 0's only
        deepspeed.utils.logger.setLevel(logging.WARNING)

    task.to(device)
    opt = build_optimizer(task, cfg.optim, device)
    engine, _, _, _ = deepspeed.initialize(model=task, optimizer=opt,
                                           lr_scheduler=lambda o: build_scheduler(o, cfg.optim),
                                           config=build_ds_config(cfg.engine, cfg.optim, plan))
    return engine


def _client_state(step: int, samples: int, data: _Data) -> dict:
    return {"step": step, "samples_seen": samples, "epoch": data.epoch, "batch_in_epoch": data.batch_in_epoch}


def train(cfg: Any, task: nn.Module, make_loader: Callable[[int, int], Iterable[dict]], *, batches_per_epoch: int,
          samples_per_batch: Callable[[dict], int] | None = None,
          evaluate: Callable[[nn.Module, int], dict] | None = None) -> dict:
    """Train `task` for cfg.optim.total_steps optimizer steps; see the module docstring. Returns a summary."""
    info, device = du.init_distributed()
    out_dir = Path(cfg.run.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    plan = plan_batch(micro_batch_size(cfg), info.world_size, cfg.engine)
    engine = _build_engine(cfg, task, device, plan)
    engine.train()
    ds = cfg.engine.uses_deepspeed          # DeepSpeed's bf16/fp16 modes do not autocast: cast the batch
    cast = torch.bfloat16 if ds and cfg.engine.precision == "bf16" else (
        torch.float16 if ds and cfg.engine.precision == "fp16" else None)
    compiled = None
    if cfg.engine.compile:
        from pretrain.compile import CompileStats, warn_if_limit_hit

        compiled = CompileStats()
    count = samples_per_batch or default_samples

    step, samples_seen, epoch, batch_in_epoch = 0, 0, 0, 0
    resume, state = _resume(cfg, engine, ckpt_dir)
    if resume is not None:
        step, samples_seen = int(state["step"]), int(state["samples_seen"])
        epoch, batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
    data = _Data(make_loader, batches_per_epoch, epoch, batch_in_epoch)
    tracker = Tracker(cfg, out_dir, is_main=info.is_main, total_steps=cfg.optim.total_steps, start_step=step)
    if resume is not None:
        tracker.truncate_after(step)
        tracker.message(f"resumed from {resume[0] / resume[1]} at step {step} (epoch {epoch}, batch {batch_in_epoch})")
        tracker.log(step, {"event": "resume", "checkpoint": str(resume[0] / resume[1]),
                           "rng_restored": bool(state.get("rng_restored", True))})
    flops_per_sample = _flops_per_sample(task)
    peak = peak_flops(device, cfg.engine.precision)

    nan_streak, nan_total, last_loss, last_saved, last_eval = 0, 0, float("nan"), None, None
    if resume is not None:
        last_saved = resume[0] / resume[1]      # a run resumed at total_steps still exports
    win = {"time": 0.0, "data": 0.0, "samples": 0, "steps": 0}
    try:
        with PreemptionFlag() as preempt:
            if du.any_rank(preempt.requested, device):      # a signal during start-up: nothing new to save
                _exit_for_requeue(cfg, tracker, step, last_saved, preempt)
            while step < cfg.optim.total_steps:
                t_step = time.perf_counter()
                lr_used = _lr_of(engine)
                sums: dict[str, float] = {}
                local_samples, done = 0, 0
                while done < plan.accum:
                    t0 = time.perf_counter()
                    raw = data.next()
                    win["data"] += time.perf_counter() - t0
                    batch = to_device(raw, device, cast)
                    out = engine(batch)
                    loss = out["loss"]
                    if not du.all_ranks(bool(torch.isfinite(loss.detach()).all()), device):
                        nan_streak += 1
                        nan_total += 1
                        tracker.log(step, {"event": "nonfinite_loss_skipped", "streak": nan_streak,
                                           "epoch": data.epoch, "batch_in_epoch": data.batch_in_epoch})
                        if nan_streak >= cfg.run.max_nan_steps:
                            raise TrainingDiverged(f"{nan_streak} non-finite losses in a row at step {step}; "
                                                   f"stopping (run.max_nan_steps={cfg.run.max_nan_steps})")
                        continue
                    nan_streak = 0
                    engine.backward(loss)
                    engine.step()
                    done += 1
                    local_samples += count(raw)
                    for k, v in out.items():
                        if isinstance(v, torch.Tensor) and v.numel() == 1:
                            sums[k] = sums.get(k, 0.0) + float(v.detach().float())
                hook = getattr(engine.module, "on_optimizer_step", None)
                if callable(hook):              # e.g. a momentum (EMA) model's update, after the step
                    hook()
                step += 1
                dt = time.perf_counter() - t_step
                if compiled is not None:
                    compiled.mark_warm()
                # one all-reduce per step: preemption flag, samples and the logged terms
                keys = sorted(sums)
                vec = torch.tensor([1.0 if preempt.requested else 0.0, float(local_samples)]
                                   + [sums[k] / plan.accum for k in keys], dtype=torch.float64, device=device)
                if du.is_dist():
                    dist.all_reduce(vec)
                stop = vec[0].item() > 0
                samples_seen += int(vec[1].item())
                terms = {k: vec[2 + i].item() / plan.world for i, k in enumerate(keys)}
                last_loss = terms.get("loss", last_loss)
                win["time"] += dt
                win["samples"] += local_samples
                win["steps"] += 1
                tracker.advance()
                if step % cfg.run.log_every == 0 or step == cfg.optim.total_steps or stop:
                    sps = win["samples"] / max(win["time"], 1e-9)
                    record = {**terms, "lr": lr_used,
                              "samples_per_s_gpu": sps, "data_time": win["data"] / win["steps"],
                              "step_time": win["time"] / win["steps"], "epoch": data.epoch,
                              "samples_seen": samples_seen, "nonfinite_skipped": nan_total}
                    if flops_per_sample and peak:
                        record["mfu"] = flops_per_sample * sps / peak
                    if device.type == "cuda":
                        record["max_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
                    if compiled is not None:
                        record.update(compiled.record())
                        warn_if_limit_hit(record["compile/recompiles"], tracker.message)
                    record.update({f"skipped/{k}": v for k, v in data.skips().items()})
                    tracker.log(step, record)
                    win = {"time": 0.0, "data": 0.0, "samples": 0, "steps": 0}
                if evaluate is not None and cfg.run.eval_every and step % cfg.run.eval_every == 0 \
                        and step < cfg.optim.total_steps and not stop:
                    last_eval = _evaluate(evaluate, engine, step, tracker)
                    stop = du.any_rank(preempt.requested, device)    # a signal during the evaluation
                if step % cfg.run.save_every == 0 or step == cfg.optim.total_steps or stop:
                    last_saved = ckpt.save_checkpoint(engine, ckpt_dir, step,
                                                      _client_state(step, samples_seen, data),
                                                      cfg.run.keep_checkpoints,
                                                      protect=(resume[1],) if resume is not None else ())
                if stop:
                    _exit_for_requeue(cfg, tracker, step, last_saved, preempt)
            if evaluate is not None:
                last_eval = _evaluate(evaluate, engine, step, tracker, log=False)
                if du.any_rank(preempt.requested, device):   # the requeued job evaluates again
                    _exit_for_requeue(cfg, tracker, step, last_saved, preempt)
                tracker.log(step, _flatten(last_eval, "eval/"))
            export = None
            if cfg.run.export and last_saved is not None:
                if info.is_main:
                    export = ckpt.export_consolidated(ckpt_dir, out_dir, cfg, tag=last_saved.name)
                du.barrier()
                export = export or out_dir / "export"
            if preempt.requested:
                tracker.message(f"{preempt.name()} arrived during the export: the run is complete, not requeueing")
    except TrainingDiverged:
        tracker.close()
        raise
    skipped = data.skips()
    if skipped:
        tracker.message("loader skipped samples: " + ", ".join(f"{k}={v}" for k, v in skipped.items()))
    tracker.close()
    return {"steps": step, "final_loss": last_loss, "samples_seen": samples_seen, "epoch": data.epoch,
            "short_epochs": data.short_epochs, "skipped": skipped,
            "nonfinite_skipped": nan_total, "history": str(out_dir / "metrics.jsonl"),
            "checkpoint": str(last_saved) if last_saved else None, "export": str(export) if export else None,
            "eval": last_eval, "global_batch": plan.global_batch, "grad_accum": plan.accum,
            "world_size": plan.world, "backend": "deepspeed" if ds else ("ddp" if plan.world > 1 else "plain"),
            "compile": compiled.record() if compiled is not None else None}


def _flops_per_sample(task: nn.Module) -> float | None:
    """The task's FLOPs per sample, measured without touching the RNG streams training reads: a task may count
    them with a dummy forward pass in training mode (dropout, Mask Grounding's random masking), which after a
    resume would shift every later random draw away from the uninterrupted run's."""
    flops = getattr(task, "flops_per_sample", None)
    if not callable(flops):
        return None
    state = ckpt.rng_state()
    try:
        return float(flops())
    finally:
        ckpt.set_rng_state(state)


def _resume(cfg: Any, engine: Any, ckpt_dir: Path) -> tuple[tuple[Path, str] | None, dict]:
    """The checkpoint this run continues from and its client state, or (None, {}) for a fresh start.
    Falls back past unreadable checkpoints (with a warning); refuses to start afresh over an earlier run's
    complete checkpoints, which its saves would overwrite."""
    candidates = ckpt.resume_candidates(cfg.run.resume, ckpt_dir)
    if not candidates:
        if cfg.run.resume in (None, "") and any(ckpt.is_complete(ckpt_dir, t) for t in ckpt.list_tags(ckpt_dir)):
            raise ckpt.CheckpointError(ckpt_dir, "holds an earlier run's checkpoints and run.resume is null; set "
                                                 "run.resume=latest to continue it, or choose another run.out_dir")
        return None, {}
    errors = []
    for d, tag in candidates:
        try:
            return (d, tag), ckpt.load_checkpoint(engine, d, tag)
        except ckpt.CheckpointError as e:
            errors.append(str(e))
            if du.discover().is_main and len(candidates) > 1:
                print(f"warning: {e}; trying an older checkpoint", file=sys.stderr, flush=True)
    raise ckpt.CheckpointError(candidates[0][0], f"no checkpoint could be loaded (first: {errors[0]})")


def _lr_of(engine: Any) -> float:
    """Current lr of the groups without a multiplier (the schedule's value for cfg.optim.lr)."""
    for g in engine.optimizer.param_groups:
        if g.get("lr_mult", 1.0) == 1.0:
            return float(g["lr"])
    return float(engine.optimizer.param_groups[0]["lr"])


def _evaluate(evaluate: Callable[[nn.Module, int], dict], engine: Any, step: int, tracker: Tracker,
              log: bool = True) -> dict:
    engine.module.eval()
    with torch.no_grad():
        result = evaluate(engine.module, step)
    engine.module.train()
    if log:
        tracker.log(step, _flatten(result, "eval/"))
    return result


def _exit_for_requeue(cfg: Any, tracker: Tracker, step: int, saved: Path | None, preempt: PreemptionFlag) -> None:
    """Every rank calls this after the same step (the flag went through an all-reduce): log, leave the process
    group together and exit with the requeue code. `saved` is the checkpoint the requeued job resumes from."""
    where = f"checkpoint {saved} (step {step})" if saved is not None else "no checkpoint yet"
    tracker.message(f"preemption signal ({preempt.name() or 'on another rank'}): {where}; exiting with "
                    f"{cfg.run.requeue_exit_code} for requeue")
    tracker.log(step, {"event": "preempted", "signal": preempt.name() or None,
                       "checkpoint": str(saved) if saved is not None else None})
    tracker.close()
    du.barrier()
    du.cleanup()
    sys.exit(cfg.run.requeue_exit_code)


def _flatten(d: dict, prefix: str) -> dict:
    """{"val": {"rec": {"prec@0.5": x}}} -> {"eval/val/rec/prec@0.5": x} (numbers only)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out
