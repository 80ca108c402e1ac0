"""DeepSpeed config dict derived from the typed run config.

`train_batch_size = micro x accumulation x world size` holds by construction: the accumulation is either
`engine.grad_accum` or derived exactly from `engine.global_batch_size` (a remainder is a config error, never
a silently different batch). The optimizer and schedule are torch objects passed to `deepspeed.initialize`,
so nothing here asks DeepSpeed to build (and JIT-compile) its own.
"""
from __future__ import annotations

from dataclasses import dataclass

from pretrain.config import ConfigError, EngineConfig, OptimConfig


@dataclass(frozen=True)
class BatchPlan:
    micro: int          # samples per rank per micro-step
    accum: int          # micro-steps per optimizer step
    world: int
    global_batch: int   # micro * accum * world


def plan_batch(micro: int, world: int, engine: EngineConfig) -> BatchPlan:
    """Resolve gradient accumulation so that global = micro x accum x world exactly."""
    if micro < 1 or world < 1:
        raise ConfigError(f"batch: micro batch ({micro}) and world size ({world}) must be >= 1")
    if engine.global_batch_size is None:
        accum = engine.grad_accum
    else:
        per_step = micro * world
        if engine.global_batch_size % per_step:
            raise ConfigError(f"engine.global_batch_size={engine.global_batch_size} is not a multiple of "
                              f"micro batch {micro} x world size {world} = {per_step}")
        accum = engine.global_batch_size // per_step
    return BatchPlan(micro, accum, world, micro * accum * world)


def build_ds_config(engine: EngineConfig, optim: OptimConfig, plan: BatchPlan) -> dict:
    """The `config=` dict for deepspeed.initialize."""
    zero: dict = {"stage": engine.zero_stage}
    if engine.zero_stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=True, reduce_scatter=True)
    if engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if engine.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    cfg = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro,
        "gradient_accumulation_steps": plan.accum,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": engine.precision == "bf16"},
        "fp16": {"enabled": engine.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,   # a torch AdamW is passed in
        "steps_per_print": 10 ** 9,              # our own logging
        "wall_clock_breakdown": False,
    }
    if engine.activation_checkpointing:
        cfg["activation_checkpointing"] = {"partition_activations": engine.zero_stage == 3,
                                           "contiguous_memory_optimization": False}
    return cfg
