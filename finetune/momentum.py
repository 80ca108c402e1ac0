"""AttBalance's momentum rectification constraint (MRC): an EMA ("momentum") copy of the model and the KL term

    L_mrc = sum_i KL(A_mom^i || A^i),   KL(P || Q) = sum_n P_n (log P_n - log Q_n)

over the LAP attention maps i (the head's, plus `model.attn_layers`' per-block maps), averaged over the batch
(../shared/METHODS.md §5). The momentum model is theta_mom <- m * theta_mom + (1 - m) * theta after every
optimizer step (the engine calls GroundingTask.on_optimizer_step), and starts as a copy of the model at the
first training forward (after any init_from weights were loaded).

The EMA is held as fp32 *buffers* of this module, not as a second set of parameters: the optimizer never
sees it, DeepSpeed's bf16 mode keeps fp32 buffers as they are (an EMA in bf16 would stall: 0.001 of a step is
below bf16's resolution), every engine saves and restores buffers with the module state, and the export's
loader (finetune.checkpoint.load_finetuned) reads `model.*` only, so inference never needs it. The momentum
model's forward runs the live module with the EMA tensors swapped in (torch.func.functional_call), in eval
mode (no dropout) and without gradient.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def kl_per_sample(target: torch.Tensor, attn: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KL(target || attn) per row: target, attn [B, N] (rows sum to 1) -> [B]. 0 log 0 = 0."""
    p, q = target.float(), attn.float()
    return (p * ((p + eps).log() - (q + eps).log())).sum(-1)


def _key(name: str) -> str:
    return name.replace(".", "__")


def _gathered(params: list[nn.Parameter]):
    """ZeRO-3 parameters are partitioned: gather them (read-only) for the duration; a no-op otherwise."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


class MomentumModel(nn.Module):
    """fp32 EMA buffers of every parameter of `model` (named like its parameters, dots as '__')."""

    def __init__(self, model: nn.Module, momentum: float) -> None:
        super().__init__()
        self.momentum = float(momentum)
        self.names = [n for n, _ in model.named_parameters()]
        for n, p in model.named_parameters():
            self.register_buffer(_key(n), torch.zeros(p.shape, dtype=torch.float32, device=p.device))
        self.register_buffer("initialised", torch.zeros(1))

    def ema(self, name: str) -> torch.Tensor:
        return getattr(self, _key(name))

    @torch.no_grad()
    def update(self, model: nn.Module, momentum: float | None = None) -> None:
        """theta_mom <- m * theta_mom + (1 - m) * theta; the first call copies theta (m = 0)."""
        m = 0.0 if not bool(self.initialised.item()) else (self.momentum if momentum is None else momentum)
        params = dict(model.named_parameters())
        with _gathered(list(params.values())):
            for n in self.names:
                self.ema(n).mul_(m).add_(params[n].detach().float(), alpha=1.0 - m)
        self.initialised.fill_(1.0)

    def ensure_initialised(self, model: nn.Module) -> None:
        if not bool(self.initialised.item()):
            self.update(model)

    @torch.no_grad()
    def attention_maps(self, model: nn.Module, *args) -> list[torch.Tensor]:
        """The momentum model's LAP maps: `model.attention_maps(*args)` with the EMA weights, eval mode."""
        dtype = next(model.parameters()).dtype
        weights = {n: self.ema(n).to(dtype) for n in self.names}
        was = model.training
        model.eval()
        try:
            return torch.func.functional_call(model, weights, args, {"attn_only": True}, strict=False)
        finally:
            model.train(was)


def mrc_per_sample(momentum_maps: list[torch.Tensor], maps: list[torch.Tensor]) -> torch.Tensor:
    """sum_i KL(A_mom^i || A^i) per sample -> [B]."""
    return torch.stack([kl_per_sample(t, a) for t, a in zip(momentum_maps, maps)]).sum(0)
