"""`engine.compile: true` on the training loop: a few steps compile (inductor, CPU) and train like the eager loop,
and a batch of another size costs one recompilation, not one per step. In-process, one thread; the compile
threads are kept at 1 (a pool of compile workers costs more than it saves on a small CPU machine)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_engine import tiny_config  # noqa: E402

SIZES = (4, 4, 3)          # an epoch of three batches, the last one short (a loader's last batch)


@pytest.fixture
def clean_dist_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)


def run(tmp_path: Path, name: str, compile: bool, **over) -> tuple[dict, list[dict]]:
    import torch

    import engine_tiny
    from pretrain.config import PretrainConfig, load_config
    from pretrain.engine import train

    cfg = load_config(PretrainConfig, tiny_config(tmp_path, name, engine__deepspeed=False, engine__compile=compile,
                                                  optim__total_steps=6, data__batches_per_epoch=len(SIZES), **over))
    torch.manual_seed(0)
    task = engine_tiny.TinyTask()
    task.body[3].p = 0.0            # no dropout: eager and compiled kernels draw random numbers differently

    def make_loader(epoch: int, start: int):
        for i in range(start, len(SIZES)):
            yield engine_tiny.make_batch(0, epoch, i, 0, SIZES[i])

    summary = train(cfg, task, make_loader, batches_per_epoch=len(SIZES))
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return summary, [r for r in rows if "loss" in r]


def test_compiled_loop_trains_like_eager_and_recompiles_once_for_a_short_batch(tmp_path, clean_dist_env,
                                                                               monkeypatch):
    import torch._dynamo
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)
    torch._dynamo.reset()
    _, eager = run(tmp_path, "eager", False)
    summary, compiled = run(tmp_path, "compiled", True)
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-4, abs=1e-6)
    assert compiled[0]["loss"] > 2 * compiled[-1]["loss"]          # it trains
    assert all("compile/recompiles" not in r for r in eager)
    by_step = {r["step"]: r for r in compiled}
    assert by_step[1]["compile/frames"] >= 1 and by_step[1]["compile/recompiles"] == 0
    # the short batch (step 3) recompiles once with a dynamic batch dimension; steps 4-6 reuse it
    assert by_step[3]["compile/recompiles"] == 1
    assert by_step[6]["compile/recompiles"] == by_step[3]["compile/recompiles"]
    assert summary["compile"]["compile/recompiles"] == 1 and summary["compile"]["compile/graph_breaks"] == 0


def test_compile_dynamic_true_needs_no_recompile(tmp_path, clean_dist_env, monkeypatch):
    """engine.compile_dynamic=true (and the trace-only aot_eager backend): one compilation serves every size."""
    import torch._dynamo

    torch._dynamo.reset()
    summary, rows = run(tmp_path, "dyn", True, engine__compile_dynamic=True, engine__compile_backend="aot_eager")
    assert summary["compile"]["compile/recompiles"] == 0 and summary["compile"]["compile/frames"] >= 1
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_bad_compile_settings_are_one_line_config_errors():
    from pretrain.config import ConfigError, PretrainConfig, load_config

    with pytest.raises(ConfigError, match="engine.backend: expected one of deepspeed, ddp"):
        load_config(PretrainConfig, None, ["engine.backend=fsdp"])
    with pytest.raises(ConfigError, match="engine.compile_dynamic: expected true/false"):
        load_config(PretrainConfig, None, ["engine.compile_dynamic=sometimes"])
    with pytest.raises(ConfigError, match="engine.offload_.*backend=deepspeed"):
        load_config(PretrainConfig, None, ["engine.backend=ddp", "engine.offload_optimizer=true"])
