"""The sbatch scripts on a real one-node SLURM (tests/slurm_cluster.py: slurm-wlm + munge in a temporary
folder, installed with apt-get when missing): pretraining with 2 CPU tasks preempted by `scancel --signal=USR1`
and again by `--signal=TERM`, fine-tuning stopped by its time limit's `--signal=USR1@T`, each requeued by the
script, resumed and completed with every step logged once; the shards array job; an impossible request.
Skipped, with the reason, where SLURM cannot run (not root, no apt-get, no network to install it)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import slurm_cluster

ROOT = Path(__file__).resolve().parents[1]
# Minutes on an idle 2-core machine; the waits and the test timeout leave room for a busy one (5x slower seen).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]

# A CPU-only request for this 2-core node (the README's command for CPU partitions).
CPU = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1"]
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


class Cluster:
    def __init__(self, d: Path, env: dict):
        self.dir, self.env = d, env

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(list(cmd), env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} -> {r.returncode}: {r.stderr}")
        return r

    def sbatch(self, *args: str) -> str:
        """Submit from the repository root (the scripts cd to SLURM_SUBMIT_DIR); returns the job id."""
        return self.run("sbatch", "--parsable", *args).stdout.strip().split(";")[0]

    def job(self, job: str) -> dict[str, str]:
        return slurm_cluster.job_info(job, self.env)

    def wait(self, what: str, cond, job: str | None, timeout: float, log: Path | None = None) -> None:
        """Poll `cond` until true; fail at the timeout or as soon as `job` ended without it."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if cond():
                return
            if job is not None and self.job(job).get("JobState") in ENDED and not cond():
                break
            time.sleep(0.5)
        text = log.read_text() if log is not None and log.is_file() else ""
        first = text.find("Traceback")
        tail = (text[max(0, first - 500):first + 3000] + "\n...\n" if first >= 0 else "") + text[-2000:]
        ctld = (self.dir / "log" / "slurmctld.log").read_text()[-1500:]
        raise AssertionError(f"no {what} (waited {timeout - (deadline - time.time()):.0f}s); "
                             f"job {self.job(job) if job else ''}\n"
                             f"--- job output\n{tail}\n--- slurmctld.log\n{ctld}")


@pytest.fixture(scope="module")
def cluster():
    d = Path(tempfile.mkdtemp(prefix="vlp-slurm-"))
    try:
        env = slurm_cluster.up(d)
    except slurm_cluster.Unavailable as e:
        shutil.rmtree(d, ignore_errors=True)
        pytest.skip(f"no real SLURM here: {e}")
    # what the jobs run: this interpreter and this checkout (sbatch exports the environment); no rendezvous
    # left over from the test process (in-process engine tests export MASTER_PORT etc.)
    env = {k: v for k, v in env.items() if not k.startswith(("SLURM_", "MASTER_"))
           and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")} | {"SLURM_CONF": env["SLURM_CONF"]}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               WANDB_MODE="offline", PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p))
    try:
        yield Cluster(d, env)
    finally:
        slurm_cluster.down(d)
        if not os.environ.get("VLP_KEEP_SLURM_DIR"):      # keep the logs for a look by hand
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def demo(cluster):
    """`python -m shards demo`: the shards and the tokenizer the smoke configs read."""
    out = cluster.dir / "demo"
    r = subprocess.run([sys.executable, "-m", "shards", "demo", "--out", str(out), "--workers", "1"],
                       env=cluster.env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def rows(out: Path) -> list[dict]:
    f = out / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []


def train_steps(out: Path) -> list[int]:
    return [r["step"] for r in rows(out) if "loss" in r]


def events(out: Path, name: str) -> list[dict]:
    return [r for r in rows(out) if r.get("event") == name]


def test_pretrain_preempted_by_usr1_then_term_requeues_resumes_and_completes(cluster, demo):
    out, log, total = cluster.dir / "pretrain", cluster.dir / "pretrain.out", 24
    sources = "data.sources=[" + ", ".join(f"{{name: {n}, shards: '{demo / 'shards' / n}', weight: 1.0}}"
                                           for n in ("coco", "vg", "cc3m")) + "]"
    job = cluster.sbatch(*CPU, f"--output={log}", "slurm/pretrain.sbatch", "configs/pretrain/smoke.yaml", sources,
                         f"model.text.tokenizer={demo / 'tokenizer'}", f"run.out_dir={out}",
                         f"optim.total_steps={total}", "run.save_every=5")
    cluster.wait("step 4", lambda: max(train_steps(out), default=0) >= 4, job, 900, log)
    cluster.run("scancel", "--signal=USR1", job)
    cluster.wait("the first requeue", lambda: cluster.job(job).get("Restarts") == "1", job, 600, log)
    first = events(out, "preempted")
    assert len(first) == 1 and first[0]["signal"] == "SIGUSR1", first
    stop1 = first[0]["step"]
    assert 4 <= stop1 < total and (out / "checkpoints" / f"step_{stop1:08d}").is_dir()
    assert max(train_steps(out)) == stop1               # every rank stopped after the same step
    cluster.wait("progress after the resume", lambda: len(events(out, "resume")) == 1
                 and max(train_steps(out)) >= stop1 + 3, job, 900, log)
    assert cluster.job(job)["JobState"] == "RUNNING"
    cluster.run("scancel", "--signal=TERM", job)
    cluster.wait("completion", lambda: cluster.job(job).get("JobState") in ENDED, job, 1500, log)
    info = cluster.job(job)
    text = log.read_text()
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("COMPLETED", "2", "0:0"), text[-3000:]
    assert train_steps(out) == list(range(1, total + 1))   # every step logged exactly once
    pre = events(out, "preempted")
    assert [p["signal"] for p in pre] == ["SIGUSR1", "SIGTERM"] and pre[1]["step"] > stop1
    assert [r["step"] for r in events(out, "resume")] == [p["step"] for p in pre]
    assert text.count("requeueing job") == 2 and "Traceback" not in text
    assert (out / "export" / "model.safetensors").is_file()
    assert (out / "checkpoints" / "latest").read_text() == f"step_{total:08d}"


def test_finetune_time_limit_signal_requeues_resumes_and_completes(cluster, demo):
    """--time=2 --signal=USR1@60: SLURM sends USR1 30-60 s into the job (it may come up to 60 s early); the run
    saves and requeues; the test then lifts the limit so the requeued job finishes. 150 steps take longer than
    60 s even on an idle machine, so the signal always comes mid-run."""
    out, log, total = cluster.dir / "finetune", cluster.dir / "finetune.out", 150
    job = cluster.sbatch(*CPU, "--time=2", "--signal=USR1@60", f"--output={log}", "slurm/finetune.sbatch",
                         "configs/finetune/smoke.yaml", f"data.shards={demo / 'shards' / 'refcoco'}",
                         f"model.text.tokenizer={demo / 'tokenizer'}", f"run.out_dir={out}",
                         f"optim.total_steps={total}", "optim.step_milestones=[120]", "run.save_every=25")
    cluster.wait("the time-limit requeue", lambda: cluster.job(job).get("Restarts") == "1", job, 600, log)
    cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=60")
    pre = events(out, "preempted")
    assert len(pre) == 1 and pre[0]["signal"] == "SIGUSR1", (pre, log.read_text()[-3000:])
    cluster.wait("completion", lambda: cluster.job(job).get("JobState") in ENDED, job, 1500, log)
    info = cluster.job(job)
    text = log.read_text()
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("COMPLETED", "1", "0:0"), text[-3000:]
    assert train_steps(out) == list(range(1, total + 1))
    assert "Traceback" not in text
    evals = [r for r in rows(out) if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evals] == [total]          # the final evaluation, once
    assert set(json.loads((out / "eval.json").read_text())) == {"val"}


def test_shards_array_job_builds_in_parallel_and_resumes(cluster, demo):
    from shards.demo import demo_commands

    out = cluster.dir / "array"
    coco, cc3m = [c for c in demo_commands(demo / "raw", out, workers=1) if c[0] in ("coco", "img2dataset")]
    cmds = cluster.dir / "cmds.txt"
    cmds.write_text("# one shard set per line: the demo's coco and cc3m commands\n"
                    + " ".join(coco) + "\n\n" + " ".join(cc3m) + "\n")
    logs = cluster.dir / "shards-%A_%a.out"
    job = cluster.sbatch("--array=0-2", "--cpus-per-task=1", f"--output={logs}", "slurm/shards.sbatch", str(cmds))
    tasks = [f"{job}_{i}" for i in range(3)]
    cluster.wait("the array", lambda: all(cluster.job(t).get("JobState") in ("COMPLETED", "FAILED")
                                          for t in tasks), None, 300)
    states = [cluster.job(t) for t in tasks]
    assert [(s["JobState"], s["ExitCode"]) for s in states] == [("COMPLETED", "0:0"), ("COMPLETED", "0:0"),
                                                                 ("FAILED", "2:0")]
    starts = [s["StartTime"] for s in states[:2]]
    assert starts[0] == starts[1] or abs(time.mktime(time.strptime(starts[0], "%Y-%m-%dT%H:%M:%S"))
                                         - time.mktime(time.strptime(starts[1], "%Y-%m-%dT%H:%M:%S"))) <= 2
    assert "no command for array task 2" in Path(str(logs).replace("%A", job).replace("%a", "2")).read_text()
    manifest = json.loads((out / "coco" / "manifest.json").read_text())
    assert manifest["samples"] > 0
    # same arguments -> same bytes as the demo's coco set (output does not depend on workers)
    assert manifest["shards"] == json.loads((demo / "shards" / "coco" / "manifest.json").read_text())["shards"]
    # resubmitting a task resumes: finished shards are kept, the manifest is unchanged
    (out / "coco" / "manifest.json").unlink()
    again = cluster.sbatch("--array=0", "--cpus-per-task=1", f"--output={logs}", "slurm/shards.sbatch", str(cmds))
    cluster.wait("the resubmitted task", lambda: cluster.job(f"{again}_0").get("JobState") in
                 ("COMPLETED", "FAILED"), None, 120)
    assert cluster.job(f"{again}_0")["JobState"] == "COMPLETED"
    assert json.loads((out / "coco" / "manifest.json").read_text())["shards"] == manifest["shards"]


def test_an_impossible_request_fails_at_submission(cluster):
    """Plain sbatch queues 96 CPUs on this 2-CPU node forever; slurm/submit refuses it with one line."""
    job = cluster.sbatch("--gpus-per-node=0", "--output=/dev/null", "slurm/pretrain.sbatch",
                         "configs/pretrain/smoke.yaml")
    try:
        cluster.wait("a pending reason", lambda: cluster.job(job).get("Reason") not in (None, "None"), job, 30)
        assert (cluster.job(job)["JobState"], cluster.job(job)["Reason"]) == ("PENDING", "PartitionConfig")
    finally:
        cluster.run("scancel", job)
    for flags in (["--gpus-per-node=0"], []):                 # too many CPUs; GPUs on a node without any
        r = cluster.run("slurm/submit", *flags, "slurm/pretrain.sbatch", "configs/pretrain/smoke.yaml", check=False)
        assert r.returncode == 2 and r.stdout == "", r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: SLURM cannot run this request"), r.stderr
    r = cluster.run("slurm/submit", *CPU, "--output=/dev/null", "--hold", "slurm/pretrain.sbatch",
                    "configs/pretrain/smoke.yaml")
    held = r.stdout.split()[-1]
    assert r.stdout.startswith("Submitted batch job") and cluster.job(held)["JobState"] == "PENDING"
    cluster.run("scancel", held)
