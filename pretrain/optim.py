"""AdamW parameter groups and the step-based learning-rate schedule.

Groups follow X-VLM/BERT practice: no weight decay on biases, norm weights and embeddings (found by name and
by ndim <= 1), and an lr multiplier per parameter-name prefix from `task.lr_multipliers()` (new heads x2).
The schedule is a torch `LambdaLR` (warm-up, then linear / cosine / step / constant) counted in optimizer
steps, so it is the same object under DeepSpeed and in the plain loop.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from pretrain.config import OptimConfig

NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.RMSNorm)
# timm keeps these as bare parameters (pos_embed is [1, N, D], so ndim alone does not catch it)
NO_DECAY_LEAF_NAMES = ("pos_embed", "cls_token", "reg_token", "dist_token", "temp", "mask_token")


def no_decay_names(model: nn.Module) -> set[str]:
    """Biases, norm scales, embeddings, position/class tokens and 1-element scalars such as the temperature."""
    names = set()
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(mod, NO_DECAY_MODULES) or p.ndim <= 1 or p_name in NO_DECAY_LEAF_NAMES:
                names.add(full)
    return names


def lr_multiplier(name: str, multipliers: dict[str, float]) -> float:
    """Multiplier of the longest matching prefix (1.0 when none matches)."""
    best, best_len = 1.0, -1
    for prefix, mult in multipliers.items():
        if name.startswith(prefix) and len(prefix) > best_len:
            best, best_len = float(mult), len(prefix)
    return best


def param_groups(model: nn.Module, cfg: OptimConfig, multipliers: dict[str, float] | None = None) -> list[dict]:
    """Trainable parameters split by (decay?, lr multiplier); each group carries its own `lr_mult`."""
    multipliers = dict(multipliers or {})
    skip_decay = no_decay_names(model)
    buckets: dict[tuple[bool, float], list[tuple[str, nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (name not in skip_decay, lr_multiplier(name, multipliers))
        buckets.setdefault(key, []).append((name, p))
    groups = []
    for (decay, mult), items in sorted(buckets.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
        groups.append({
            "params": [p for _, p in items],
            "names": [n for n, _ in items],
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "lr": cfg.lr * mult,
            "lr_mult": mult,
        })
    return groups


def task_multipliers(task: nn.Module) -> dict[str, float]:
    fn = getattr(task, "lr_multipliers", None)
    return dict(fn()) if callable(fn) else {}


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """torch AdamW over `param_groups` (DeepSpeed gets this object, so it never JIT-builds its own Adam)."""
    groups = param_groups(model, cfg, task_multipliers(model))
    for g in groups:
        g.pop("names")
    fused = cfg.fused and device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=fused or None)


def lr_factor(step: int, cfg: OptimConfig) -> float:
    """Factor applied to every group's base lr after `step` optimizer steps."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    span = max(1, cfg.total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    if cfg.schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "step":
        return cfg.step_gamma ** sum(1 for m in cfg.step_milestones if step >= m)
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


def current_lrs(optimizer: torch.optim.Optimizer) -> Iterable[float]:
    return [g["lr"] for g in optimizer.param_groups]
