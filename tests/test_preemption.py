"""Preemption at every moment, without SLURM: what SLURM does (USR1/TERM to every process of the step) done by
hand to real processes. Children and workers of a shielded process keep running; the run stops for requeue
before the first step (nothing saved), after a step (every rank at the same step), after the final evaluation
(not logged: the requeued job evaluates again), and completes when the signal comes during the export.
tests/test_slurm_real.py does the same through a real SLURM."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from test_engine import ROOT, SCRIPT, env, losses, run_tiny, tiny_config

pytestmark = pytest.mark.slow


def test_children_workers_and_threads_keep_running_when_the_whole_group_is_signalled(tmp_path):
    """install() in the main process; a fork worker, an exec'd program and a thread started afterwards; then
    TERM and USR1 to the whole process group (what SLURM does to a step). Only the main process reacts."""
    script = tmp_path / "shielded.py"
    script.write_text(textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(ROOT)!r})
        from pretrain.preemption import install
        flag = install()
        import multiprocessing as mp, os, signal, subprocess, threading, time

        def worker():
            time.sleep(2.0)

        if __name__ == "__main__":
            mp.set_start_method("fork")
            w = mp.Process(target=worker); w.start()
            child = subprocess.Popen(["sleep", "2"])
            t = threading.Thread(target=time.sleep, args=(2.0,)); t.start()
            print("ready", flush=True)
            while not flag.requested:
                time.sleep(0.05)
            print("flag", flag.name(), flush=True)
            w.join(); t.join()
            print("worker", w.exitcode, "child", child.wait(), flush=True)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "ready"
    os.killpg(proc.pid, signal.SIGTERM)
    os.killpg(proc.pid, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    words = out.split()
    assert words[0] == "flag" and words[1] in ("SIGTERM", "SIGUSR1")    # both pending: either is taken first
    assert words[2:] == ["worker", "0", "child", "0"]


def events(out: Path, name: str) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if r.get("event") == name]


def test_signal_during_start_up_exits_for_requeue_with_nothing_saved(tmp_path):
    cfg = tiny_config(tmp_path, run__requeue_exit_code=85)
    r = run_tiny(cfg, check=False, ENGINE_TINY_SIGNAL="startup:TERM")
    assert r.returncode == 85 and "Traceback" not in r.stderr, r.stderr[-2000:]
    out = tmp_path / "run"
    assert not (out / "checkpoints" / "latest").exists()
    assert [(e["step"], e["signal"], e["checkpoint"]) for e in events(out, "preempted")] == [(0, "SIGTERM", None)]
    assert losses(out) == {}


def test_signal_to_one_rank_stops_both_after_the_same_step(tmp_path):
    """USR1 to rank 1 alone while it loads batch 3: the flag goes through the step's all-reduce, both ranks save
    step 3 (DeepSpeed, 2 processes) and exit with the requeue code (resuming is tested elsewhere)."""
    cfg = tiny_config(tmp_path, run__save_every=100)
    r = run_tiny(cfg, nproc=2, check=False, ENGINE_TINY_SIGNAL="batch2:USR1:1")
    assert r.returncode != 0 and "exiting with 85 for requeue" in r.stdout + r.stderr, r.stderr[-3000:]
    out = tmp_path / "run"
    assert (out / "checkpoints" / "latest").read_text() == "step_00000003"
    assert [(e["step"], e["signal"]) for e in events(out, "preempted")] == [(3, None)]   # rank 0 got nothing
    assert sorted(losses(out)) == [1, 2, 3]


def test_signal_during_the_final_evaluation_requeues_and_evaluates_once(tmp_path):
    cfg = tiny_config(tmp_path)
    r = run_tiny(cfg, check=False, ENGINE_TINY_EVAL="1", ENGINE_TINY_SIGNAL="eval:USR1")
    assert r.returncode == 85, r.stderr[-2000:]
    out = tmp_path / "run"
    assert (out / "checkpoints" / "latest").read_text() == "step_00000008"
    assert not (out / "export").exists()
    run_tiny(cfg, ENGINE_TINY_EVAL="1")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/score" in r] == [8]
    assert sorted(losses(out)) == list(range(1, 9)) and (out / "export" / "model.safetensors").is_file()


def test_signal_during_the_export_completes_the_run(tmp_path):
    cfg = tiny_config(tmp_path)
    r = run_tiny(cfg, check=False, ENGINE_TINY_SIGNAL="export:TERM")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "arrived during the export: the run is complete" in r.stdout
    out = tmp_path / "run"
    assert (out / "export" / "model.safetensors").is_file() and events(out, "preempted") == []


def session_commands(sid: int) -> set[str]:
    """Names of the processes in session `sid` (a process started with start_new_session and its children)."""
    names = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if os.getsid(int(p.name)) == sid:
                    names.add((p / "comm").read_text().strip())
            except (OSError, ValueError):
                pass
    return names


@pytest.mark.timeout(1800)                  # a C++ build: 30 s on an idle 2-core machine, minutes on a busy one
def test_signal_to_the_whole_group_during_a_deepspeed_op_build(tmp_path):
    """DeepSpeed JIT-compiles its shared-memory op at start-up (ninja + c++, children of the rank). USR1 to every
    process of the group while it compiles: the build completes, the run exits for requeue with nothing saved."""
    ext = tmp_path / "torch_extensions"                      # empty: this run must build the op
    cfg = tiny_config(tmp_path)
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--config", str(cfg)], start_new_session=True,
                            env=env(TORCH_EXTENSIONS_DIR=str(ext)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while not {"ninja", "cc1plus"} & session_commands(proc.pid) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before its op build started"
    os.killpg(proc.pid, signal.SIGUSR1)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 85, err[-3000:]
    assert "Traceback" not in err and "built successfully" in out, err[-3000:]
    assert list(ext.rglob("*.so")), "the op build did not finish"
    assert events(tmp_path / "run", "preempted")[0]["checkpoint"] is None
