"""`engine.compile: true`: torch.compile the task inside whichever engine runs it, and count recompilations.

    compile_engine(engine, cfg.engine)      # after the engine is built, before the first step
    stats = CompileStats(); ...; stats.record()  # {"compile/frames": n, "compile/recompiles": k, ...}

DeepSpeed compiles through `DeepSpeedEngine.compile` (which calls `nn.Module.compile` on the task, in place:
parameter names and checkpoints do not change); the PyTorch engine compiles its forward module the same way
(the DDP wrapper when there are several processes, so dynamo's DDPOptimizer splits the graph at the gradient
buckets and the all-reduces overlap the backward pass).

Shapes. Both loaders produce fixed shapes while training: texts are padded to `max_len` (shards.text.tokenize),
the region sub-batch sizes are fixed (`data.region_texts`, `data.region_images`), pretraining epochs are a fixed
number of full batches and the grounding loader drops the last training batch. What still changes is the
evaluation (eval mode, no_grad, a short last batch). `engine.compile_dynamic: null` (the default) leaves torch's
automatic dynamic shapes on: a dimension that changes once is recompiled as dynamic, so each change costs one
recompilation, not one per step; `true` compiles dynamic from the start, `false` specialises every shape.
`CompileStats` reads torch._dynamo's counters: frames compiled, graph breaks, and how many frames were
(re)compiled after the first optimizer step, the figure that must stay bounded.
"""
from __future__ import annotations

import sys
from typing import Any


def compile_kwargs(ecfg: Any) -> dict:
    """Keyword arguments for `nn.Module.compile` from an EngineConfig (backend excluded)."""
    return {"dynamic": ecfg.compile_dynamic}


def compile_engine(engine: Any, ecfg: Any) -> None:
    """Compile the task inside `engine` (a DeepSpeedEngine or pretrain.plain_engine.PlainEngine) in place."""
    import torch._dynamo

    # the loop runs a few distinct graphs (train, eval, no_grad); leave room before dynamo falls back to eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
    engine.compile(backend=ecfg.compile_backend, compile_kwargs=compile_kwargs(ecfg))


def dynamo_counts() -> dict[str, int]:
    """Frames dynamo compiled, graphs it produced and graph breaks, so far in this process."""
    from torch._dynamo.utils import counters

    return {"frames": int(counters["frames"].get("ok", 0)),
            "graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


class CompileStats:
    """Counts of compilation during a run: `mark_warm()` after the first optimizer step; `record()` gives the
    figures to log (compile/frames, compile/graphs, compile/graph_breaks, compile/recompiles = frames compiled
    after the first step)."""

    def __init__(self) -> None:
        self.start = dynamo_counts()
        self.warm: dict[str, int] | None = None

    def mark_warm(self) -> None:
        if self.warm is None:
            self.warm = dynamo_counts()

    def record(self) -> dict[str, int]:
        now = dynamo_counts()
        out = {f"compile/{k}": now[k] - self.start[k] for k in now}
        out["compile/recompiles"] = now["frames"] - (self.warm or now)["frames"]
        return out


def warn_if_limit_hit(recompiles: int, log=None) -> None:
    """A loud line when recompilations approach dynamo's limit (past it dynamo silently runs eager)."""
    import torch._dynamo

    limit = torch._dynamo.config.recompile_limit
    if recompiles >= limit // 2:
        msg = (f"warning: {recompiles} recompilations after the first step (dynamo falls back to eager at "
               f"{limit} per frame); TORCH_LOGS=recompiles shows why")
        (log or (lambda m: print(m, file=sys.stderr, flush=True)))(msg)
