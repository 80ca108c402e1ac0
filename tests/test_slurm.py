"""sbatch scripts without a SLURM: syntax, the srun command they launch under faked SLURM variables (scontrol/srun
shimmed on PATH), the requeue on the requeue exit code, a signal to the batch shell handed to srun. These run
everywhere; tests/test_slurm_real.py runs the same scripts on a real SLURM where one can be started."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pretrain.distributed import discover, parse_nodelist, slurm_port

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "slurm"


def stubs(tmp_path: Path, srun_rc: int = 0) -> Path:
    """scontrol/srun stand-ins that log their arguments to tmp_path/calls.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    (bin_dir / "scontrol").write_text(f"""#!/bin/bash
echo "scontrol $*" >> {log}
if [ "$1 $2" = "show hostnames" ]; then echo gpu-a07; echo gpu-a08; fi
""")
    (bin_dir / "srun").write_text(f"""#!/bin/bash
echo "srun $* MASTER=$MASTER_ADDR:$MASTER_PORT" >> {log}
exit {srun_rc}
""")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def slurm_env(tmp_path: Path, bin_dir: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-a[07-08]",
               SLURM_NNODES="2", SLURM_NTASKS="16", SLURM_CPUS_PER_TASK="12", SLURM_SUBMIT_DIR=str(ROOT), **extra)
    return env


@pytest.mark.parametrize("script", sorted(p.name for p in SLURM.glob("*.sbatch")) + ["env.sh", "submit"])
def test_scripts_pass_bash_n(script):
    r = subprocess.run(["bash", "-n", str(SLURM / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script", ["pretrain.sbatch", "finetune.sbatch"])
def test_sbatch_headers_ask_for_signal_and_requeue(script):
    text = (SLURM / script).read_text()
    assert "#SBATCH --requeue" in text
    assert "#SBATCH --signal=USR1@" in text


@pytest.mark.parametrize("script, module", [("pretrain.sbatch", "pretrain"), ("finetune.sbatch", "finetune")])
def test_dry_run_launches_the_right_command(tmp_path, script, module):
    bin_dir = stubs(tmp_path)
    r = subprocess.run(["bash", str(SLURM / script), f"configs/{module}/smoke.yaml", "optim.lr=2e-4"],
                       env=slurm_env(tmp_path, bin_dir, DRY_RUN="1"), capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("srun ")]
    assert lines == [f"srun --kill-on-bad-exit=1 --cpu-bind=none python -m {module} --config "
                     f"configs/{module}/smoke.yaml run.resume=latest run.requeue_exit_code=85 optim.lr=2e-4"]
    assert "master gpu-a07:" + str(15000 + 4242 % 20000) in r.stdout
    assert "scontrol show hostnames gpu-a[07-08]" in (tmp_path / "calls.log").read_text()


def test_requeue_on_requeue_exit_code(tmp_path):
    bin_dir = stubs(tmp_path, srun_rc=85)
    r = subprocess.run(["bash", str(SLURM / "pretrain.sbatch"), "configs/pretrain/smoke.yaml"],
                       env=slurm_env(tmp_path, bin_dir), capture_output=True, text=True)
    assert r.returncode == 85
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls[-2].startswith("srun --kill-on-bad-exit=1") and "MASTER=gpu-a07:19242" in calls[-2]
    assert calls[-1] == "scontrol requeue 4242"


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_to_the_batch_shell_reaches_the_tasks_as_usr1(tmp_path, sig):
    """scancel --batch/--full or --signal=B:USR1@T signal the batch shell: it must survive, hand the signal to
    srun as USR1 (srun passes it to every task; TERM would make srun kill the step) and requeue on 85."""
    bin_dir = stubs(tmp_path)
    log = tmp_path / "calls.log"
    (bin_dir / "srun").write_text(f"""#!/bin/bash
trap 'echo "srun got USR1" >> {log}; exit 85' USR1
trap 'echo "srun got TERM" >> {log}; exit 143' TERM
echo "srun started" >> {log}
for i in $(seq 300); do sleep 0.1; done
exit 0
""")
    proc = subprocess.Popen(["bash", str(SLURM / "pretrain.sbatch"), "configs/pretrain/smoke.yaml"],
                            env=slurm_env(tmp_path, bin_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    while "srun started" not in (log.read_text() if log.is_file() else "") and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    calls = log.read_text().splitlines()
    assert proc.returncode == 85, err
    assert "srun got USR1" in calls and "srun got TERM" not in calls
    assert calls[-1] == "scontrol requeue 4242"
    assert f"batch shell got {signal.Signals(sig).name[3:]}" in out


def test_no_requeue_on_failure(tmp_path):
    bin_dir = stubs(tmp_path, srun_rc=1)
    r = subprocess.run(["bash", str(SLURM / "pretrain.sbatch"), "configs/pretrain/smoke.yaml"],
                       env=slurm_env(tmp_path, bin_dir), capture_output=True, text=True)
    assert r.returncode == 1
    assert "scontrol requeue" not in (tmp_path / "calls.log").read_text()


def test_shards_array_task_runs_its_line(tmp_path):
    bin_dir = stubs(tmp_path)
    cmds = tmp_path / "cmds.txt"
    cmds.write_text("# shard sets\ncoco --images /d/coco --captions /d/c.json --out /s/coco\n\n"
                    "vg --images /d/vg --image-data /d/i.json --regions /d/r.json --out /s/vg --workers 3\n")
    env = slurm_env(tmp_path, bin_dir, DRY_RUN="1", SLURM_ARRAY_TASK_ID="1")
    r = subprocess.run(["bash", str(SLURM / "shards.sbatch"), str(cmds)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("python -m shards vg --images /d/vg --image-data /d/i.json --regions /d/r.json "
                                "--out /s/vg --workers 3")
    env["SLURM_ARRAY_TASK_ID"] = "0"
    r = subprocess.run(["bash", str(SLURM / "shards.sbatch"), str(cmds)], env=env, capture_output=True, text=True)
    assert r.stdout.strip().endswith("--out /s/coco --workers 12")
    env["SLURM_ARRAY_TASK_ID"] = "5"
    r = subprocess.run(["bash", str(SLURM / "shards.sbatch"), str(cmds)], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "no command for array task 5" in r.stderr


def test_nodelist_parser_matches_scontrol_forms():
    assert parse_nodelist("gpu-a[07-09]") == ["gpu-a07", "gpu-a08", "gpu-a09"]
    assert parse_nodelist("n[1,3-4],login5") == ["n1", "n3", "n4", "login5"]
    assert parse_nodelist("node17") == ["node17"]


def test_rank_discovery_from_slurm_and_torchrun_variables():
    slurm = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "4242",
             "SLURM_JOB_NODELIST": "zz-nohost[3-6]"}
    info = discover(slurm)
    assert (info.rank, info.local_rank, info.world_size, info.source) == (5, 1, 8, "slurm")
    assert info.master_port == slurm_port("4242") == 19242
    assert info.master_addr in ("zz-nohost3",)       # parser fallback (no real scontrol knows this list)
    torchrun = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.1",
                "MASTER_PORT": "29400", **slurm}
    info = discover(torchrun)                        # torchrun inside an allocation wins
    assert (info.rank, info.world_size, info.master_addr, info.master_port, info.source) == \
        (3, 4, "10.0.0.1", 29400, "torchrun")
    assert discover({}).world_size == 1
