"""The PyTorch engine (`engine.backend: ddp`, or `engine.deepspeed: false`): plain PyTorch in one process,
torch DistributedDataParallel over several (gloo on CPUs, NCCL on GPUs).

It exposes the few DeepSpeedEngine methods the loop uses (forward, backward, step, save/load_checkpoint,
compile, gradient accumulation boundaries) so that one loop serves both; checkpoints use DeepSpeed's file name
and top-level layout (`<tag>/mp_rank_00_model_states.pt` with "module", "optimizer", "lr_scheduler" and the
client state merged in), so `load_consolidated` and the export read both. Under DDP every rank holds the same
weights and optimizer state: rank 0 writes the file, every rank reads it back (the per-rank RNG files are
pretrain.checkpoint's). Gradients are averaged over ranks as DeepSpeed averages them, and accumulation skips
the all-reduce on all but the last micro-step (what `DistributedDataParallel.no_sync` does).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from pretrain.checkpoint import MODEL_STATES
from pretrain.safe_load import CheckpointError, load_pt


class PlainEngine:
    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer,
                 lr_scheduler: torch.optim.lr_scheduler.LRScheduler, *, grad_accum: int, grad_clip: float,
                 precision: str, device: torch.device, ddp: bool = False, bucket_cap_mb: float = 25.0):
        self.module = module
        self.ddp = None
        if ddp:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                               bucket_cap_mb=bucket_cap_mb, gradient_as_bucket_view=True)
        self._forward = self.ddp if self.ddp is not None else module
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.grad_accum = grad_accum
        self.grad_clip = grad_clip
        self.device = device
        self.precision = precision
        self.micro_steps = 0
        self.global_steps = 0
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def _autocast(self):
        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def __call__(self, *args, **kwargs):
        if self.ddp is not None:        # all-reduce only on the last micro-step of an accumulation (no_sync)
            self.ddp.require_backward_grad_sync = self.is_gradient_accumulation_boundary()
        with self._autocast():
            return self._forward(*args, **kwargs)

    def compile(self, backend: str = "inductor", compile_kwargs: dict | None = None) -> None:
        """torch.compile the forward module in place (the DDP wrapper under DDP), like DeepSpeedEngine.compile."""
        self._forward.compile(backend=backend, **(compile_kwargs or {}))

    def train(self, mode: bool = True) -> "PlainEngine":
        self.module.train(mode)
        return self

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.grad_accum == 0

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.grad_accum
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> None:
        if self.is_gradient_accumulation_boundary():
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.lr_scheduler.step()
            self.global_steps += 1
        self.micro_steps += 1

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool = False) -> bool:
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)    # every rank: its RNG file goes here next
        if self.ddp is not None and torch.distributed.get_rank() != 0:
            return True                 # replicas: rank 0's copy is everyone's
        state = {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "lr_scheduler": self.lr_scheduler.state_dict(), "global_steps": self.global_steps,
                 "micro_steps": self.micro_steps, **client_state}
        tmp = d / (MODEL_STATES + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, d / MODEL_STATES)
        return True

    def load_checkpoint(self, load_dir: str, tag: str):
        path = Path(load_dir) / tag / MODEL_STATES
        state = load_pt(path, map_location=self.device)
        if not isinstance(state, dict) or not {"module", "optimizer", "lr_scheduler"} <= state.keys():
            raise CheckpointError(path, "not a checkpoint of this loop (no module/optimizer/lr_scheduler)")
        self.module.load_state_dict(state.pop("module"))
        self.optimizer.load_state_dict(state.pop("optimizer"))
        self.lr_scheduler.load_state_dict(state.pop("lr_scheduler"))
        self.global_steps = int(state.pop("global_steps", 0))
        self.micro_steps = int(state.pop("micro_steps", 0))
        return str(path), state
