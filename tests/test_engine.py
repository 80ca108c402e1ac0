"""The training loop on real DeepSpeed (CPU accelerator, gloo): ZeRO-2/3 with two processes, kill-and-resume,
SIGUSR1 preemption, non-finite losses, unreachable wandb. The task is tests/engine_tiny.py's TinyTask over
deterministic synthetic batches; runs are real processes so they can be killed and signalled."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "engine_tiny.py"
PY = sys.executable


def tiny_config(tmp_path: Path, name: str = "run", **over) -> Path:
    cfg = {
        "data": {"batch_size": 4, "batches_per_epoch": 5},
        "optim": {"lr": 0.01, "warmup_steps": 2, "total_steps": 8},
        "engine": {"deepspeed": True, "zero_stage": 2, "precision": "fp32"},
        "run": {"out_dir": str(tmp_path / name), "log_every": 1, "save_every": 2, "keep_checkpoints": 2,
                "wandb": {"mode": "disabled"}},
    }
    for dotted, value in over.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def env(**extra) -> dict:
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        e.pop(k, None)
    return e


def run_tiny(config: Path, *overrides: str, nproc: int = 1, check: bool = True, **extra_env):
    if nproc > 1:
        cmd = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(SCRIPT), "--config", str(config), *overrides]
    else:
        cmd = [PY, str(SCRIPT), "--config", str(config), *overrides]
    r = subprocess.run(cmd, env=env(**extra_env), capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def losses(out_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "event" not in r}


def wait_for_step(out_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        if (out_dir / "metrics.jsonl").is_file() and max(losses(out_dir), default=0) >= step:
            return
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached in {timeout}s")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_processes_zero_train_export_and_resume(tmp_path, stage):
    cfg = tiny_config(tmp_path, engine__zero_stage=stage, optim__total_steps=4)
    run_tiny(cfg, nproc=2)
    out = tmp_path / "run"
    first = losses(out)
    assert sorted(first) == [1, 2, 3, 4] and all(map(lambda v: v == v and abs(v) < 1e6, first.values()))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 8
    assert summary["export_max_diff"] == 0.0       # consolidated fp32 export == live (gathered) weights
    assert (out / "checkpoints" / "latest").read_text() == "step_00000004"
    assert (out / "checkpoints" / "step_00000004" / "rng_rank1.pt").is_file()
    # the checkpoint loads back: a longer run resumes at step 5 instead of starting over
    run_tiny(cfg, "optim.total_steps=6", nproc=2)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "resume" and r["step"] == 4 for r in rows)
    after = [r["step"] for r in rows if "loss" in r][4:]
    assert after == [5, 6]


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    """Killed (SIGKILL) after step 5, resumed from the step-4 checkpoint: steps 5..8 repeat the uninterrupted
    losses (same data order, RNG restored; fp32 on CPU is deterministic, tolerance 1e-6 relative)."""
    full = tiny_config(tmp_path, "full")
    run_tiny(full)
    reference = losses(tmp_path / "full")

    killed = tiny_config(tmp_path, "killed")
    out = tmp_path / "killed"
    proc = subprocess.Popen([PY, str(SCRIPT), "--config", str(killed)], env=env(ENGINE_TINY_SLEEP="0.3"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(out, 5, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (out / "checkpoints" / "latest").read_text() == "step_00000004"
    run_tiny(killed)
    resumed = losses(out)
    assert sorted(resumed) == list(range(1, 9))       # step 5 logged before the kill was dropped on resume
    for step in resumed:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6), step


@pytest.mark.slow
def test_sigusr1_saves_exits_with_requeue_code_and_resumes(tmp_path):
    cfg = tiny_config(tmp_path, run__save_every=100, run__requeue_exit_code=77)
    out = tmp_path / "run"
    proc = subprocess.Popen([PY, str(SCRIPT), "--config", str(cfg)], env=env(ENGINE_TINY_SLEEP="0.3"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(out, 2, proc)
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 77, stderr[-2000:]
    assert "Traceback" not in stderr
    tag = (out / "checkpoints" / "latest").read_text()
    stopped = int(tag.split("_")[1])
    assert 2 <= stopped < 8 and (out / "checkpoints" / tag).is_dir()
    run_tiny(cfg)
    steps = sorted(losses(out))
    assert steps == list(range(1, 9))                 # continued at stopped+1, no step repeated or lost


@pytest.fixture
def clean_dist_env(monkeypatch):
    """train() exports RANK/WORLD_SIZE/...; restore the test process's environment afterwards."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)


def test_gradient_accumulation_equals_the_big_batch(tmp_path, clean_dist_env):
    """Plain loop: 2 micro-batches of 2 accumulated == 1 batch of 4 (same samples), step for step."""
    sys.path.insert(0, str(ROOT / "tests"))
    import engine_tiny

    from pretrain.config import PretrainConfig, load_config
    from pretrain.engine import train

    def run(name: str, micro: int, accum: int):
        cfg = load_config(PretrainConfig, tiny_config(tmp_path, name, engine__deepspeed=False, optim__total_steps=3,
                                                      engine__grad_accum=accum, data__batch_size=micro))
        torch.manual_seed(0)
        task = engine_tiny.TinyTask()
        task.body[3].p = 0.0                     # no dropout: the two runs must see identical computations

        def make_loader(epoch: int, start: int):
            for i in range(start, 100):
                big = engine_tiny.make_batch(0, epoch, i // accum, 0, 4)
                part = i % accum
                yield {k: v[part * micro:(part + 1) * micro] for k, v in big.items()}

        summary = train(cfg, task, make_loader, batches_per_epoch=100)
        return summary, losses(tmp_path / name), task.state_dict()

    import torch

    s_big, l_big, w_big = run("big", 4, 1)
    s_acc, l_acc, w_acc = run("acc", 2, 2)
    assert s_acc["global_batch"] == s_big["global_batch"] == 4 and s_acc["grad_accum"] == 2
    assert s_acc["samples_seen"] == s_big["samples_seen"] == 12
    assert l_acc == pytest.approx(l_big, rel=1e-5)
    for k in w_big:
        torch.testing.assert_close(w_acc[k], w_big[k], rtol=1e-5, atol=1e-6)


def test_mfu_is_logged_with_a_known_peak(tmp_path, monkeypatch, clean_dist_env):
    sys.path.insert(0, str(ROOT / "tests"))
    import engine_tiny

    monkeypatch.setattr(engine_tiny.TinyTask, "flops_per_sample", lambda self: 1e6, raising=False)
    monkeypatch.setenv("VLP_PEAK_FLOPS", "1e9")
    cfg = tiny_config(tmp_path, "mfu", engine__deepspeed=False, optim__total_steps=2)
    assert engine_tiny.main([str(cfg)]) == 0
    rows = [json.loads(x) for x in (tmp_path / "mfu" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["mfu"] == pytest.approx(1e6 * r["samples_per_s_gpu"] / 1e9) for r in rows)


def test_preemption_flag_catches_sigterm_and_sigusr1():
    from pretrain.preemption import PreemptionFlag

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        before = signal.getsignal(sig)
        with PreemptionFlag() as flag:
            assert not flag.requested
            os.kill(os.getpid(), sig)
            time.sleep(0.05)
            assert flag.requested and flag.name() == signal.Signals(sig).name
        assert signal.getsignal(sig) == before       # handlers restored


def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path, monkeypatch, clean_dist_env):
    """Plain loop in-process: two NaN batches are skipped (logged, no step), three in a row stop the run."""
    sys.path.insert(0, str(ROOT / "tests"))
    import engine_tiny

    from pretrain.engine import TrainingDiverged

    monkeypatch.setenv("ENGINE_TINY_NAN", "1,2")
    cfg = tiny_config(tmp_path, "skip", engine__deepspeed=False, run__max_nan_steps=3, optim__total_steps=4)
    assert engine_tiny.main([str(cfg)]) == 0
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["nonfinite_skipped"] == 2
    assert all(v == v for v in losses(tmp_path / "skip").values())

    monkeypatch.setenv("ENGINE_TINY_NAN", "1,2,3")
    cfg = tiny_config(tmp_path, "stop", engine__deepspeed=False, run__max_nan_steps=3, optim__total_steps=4)
    with pytest.raises(TrainingDiverged, match="3 non-finite losses in a row"):
        engine_tiny.main([str(cfg)])


@pytest.mark.slow
def test_unreachable_wandb_warns_once_and_the_run_finishes(tmp_path):
    cfg = tiny_config(tmp_path, engine__deepspeed=False, optim__total_steps=2,
                      run__wandb={"mode": "online", "init_timeout": 2})
    t0 = time.time()
    r = run_tiny(cfg, WANDB_MODE="online", WANDB_BASE_URL="http://127.0.0.1:9", WANDB_API_KEY="x" * 40,
                 WANDB_SILENT="true")
    assert time.time() - t0 < 120
    assert r.stderr.count("warning: wandb disabled") == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert sorted(losses(tmp_path / "run")) == [1, 2]
