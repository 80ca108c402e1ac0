"""`engine.backend: ddp` with two CPU processes (torchrun, gloo): it trains with replicas in sync, writes
DeepSpeed's checkpoint layout from rank 0, and a run preempted mid-way (SIGUSR1 -> save -> requeue exit) then
resumed repeats the uninterrupted run's losses and exports the same weights."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_engine import losses, run_tiny, tiny_config  # noqa: E402


@pytest.mark.slow
def test_ddp_two_processes_resume_and_export_equal_the_uninterrupted_run(tmp_path):
    from pretrain.checkpoint import MODEL_STATES, load_consolidated

    over = dict(engine__backend="ddp", optim__total_steps=6, run__save_every=100)
    full_cfg = tiny_config(tmp_path, "full", **over)
    run_tiny(full_cfg, nproc=2)
    full = tmp_path / "full"
    summary = json.loads((full / "summary.json").read_text())
    assert summary["backend"] == "ddp" and summary["world_size"] == 2 and summary["global_batch"] == 8
    assert summary["export_max_diff"] == 0.0           # rank 0's export == the live weights of rank 0
    tag = full / "checkpoints" / "step_00000006"
    assert (tag / MODEL_STATES).is_file() and (tag / "rng_rank1.pt").is_file()
    assert not list(tag.glob("*optim_states.pt"))      # one replicated file, DeepSpeed's ZeRO-0 layout

    cut_cfg = tiny_config(tmp_path, "cut", **over)
    r = run_tiny(cut_cfg, nproc=2, check=False, ENGINE_TINY_SIGNAL="batch3:USR1:1")   # rank 1 is signalled
    cut = tmp_path / "cut"
    stopped = (cut / "checkpoints" / "latest").read_text()
    assert stopped in ("step_00000003", "step_00000004"), r.stderr[-2000:]
    run_tiny(cut_cfg, nproc=2)
    assert sorted(losses(cut)) == list(range(1, 7))
    ref = losses(full)
    for step, loss in losses(cut).items():
        assert loss == pytest.approx(ref[step], rel=1e-6), step
    a, b = load_consolidated(full / "export"), load_consolidated(cut / "export")
    assert a.keys() == b.keys()
    for k in a:
        assert float((a[k] - b[k]).abs().max()) <= 1e-6, k
