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


@pytest.mark.slow
def test_python_m_pretrain_ddp_compiled_with_device_decode(tmp_path):
    """The real path: `python -m pretrain` under torchrun (2 gloo processes) on the real task and shards with
    engine.backend=ddp, engine.compile=true (the trace-only aot_eager backend keeps it to seconds; the graphs and
    guards are inductor's) and data.decode_on=gpu (decoded in the training process on the CPU): it trains,
    recompiles a bounded number of times, and exports weights a fresh task loads."""
    import subprocess

    from test_engine_cli import cli_env, tiny_pretrain_config

    config = tiny_pretrain_config(tmp_path, backend="ddp", compile=True, compile_backend="aot_eager")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "pretrain", "--config", str(config), "data.decode_on=gpu", "optim.total_steps=4"],
                       env=cli_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["backend"] == "ddp" and summary["world_size"] == 2 and summary["steps"] == 4
    assert summary["final_loss"] == summary["final_loss"]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert rows[0]["compile/frames"] >= 1
    # the loss helpers behind the all-gather's graph breaks compile once per level (image, region) in the first
    # steps; from step 2 on nothing compiles again (measured: 6, all in steps 1-2)
    assert rows[-1]["compile/recompiles"] == rows[1]["compile/recompiles"] <= 8
    from pretrain.checkpoint import load_consolidated
    from pretrain.config import PretrainConfig, load_config
    from pretrain.task import build_task
    from shards.text import build_tokenizer

    cfg = load_config(PretrainConfig, tmp_path / "run" / "export" / "config.yaml")
    assert cfg.engine.backend == "ddp" and cfg.data.decode_on == "gpu"
    task = build_task(cfg, len(build_tokenizer(tmp_path / "tok")))
    task.load_state_dict(load_consolidated(tmp_path / "run"), strict=True)
