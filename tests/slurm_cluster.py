"""A real one-node SLURM (Debian's slurm-wlm + munge) in a temporary folder, for tests and by hand.

    python tests/slurm_cluster.py up DIR      # prints `export SLURM_CONF=DIR/slurm.conf`
    python tests/slurm_cluster.py down DIR    # stops the daemons it started (by the PIDs in DIR)

Needs root (slurmd runs jobs as the submitting user and munged runs as the `munge` user). When slurmctld is
missing and `apt-get` exists, `ensure_installed()` installs `slurm-wlm munge` (about 20 s). Daemons: munged
as `munge` with its key, socket, pid and log under DIR/munge; slurmctld and slurmd as root on free ports,
state and logs under DIR. The configuration is the smallest one that runs srun steps on a laptop-size machine:
proctrack/linuxproc (no cgroups), task/none, select/cons_tres with CR_CPU, no accounting, JobRequeue=1, and
`cred_expire` short so a requeued job may start again after a few seconds instead of 120.
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

CRED_EXPIRE_S = 10


class Unavailable(RuntimeError):
    """SLURM cannot run here (the message says why); tests skip on it."""


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def ensure_installed() -> None:
    if os.geteuid() != 0:
        raise Unavailable("needs root (slurmd, and munged as the munge user)")
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch")):
        return
    if not shutil.which("apt-get"):
        raise Unavailable("slurm-wlm is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        r = _run(cmd, env=env, timeout=600)
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
            raise Unavailable(f"`{' '.join(cmd)}` failed (no network?): {tail[0]}")
    if not shutil.which("slurmctld"):
        raise Unavailable("apt-get install slurm-wlm did not provide slurmctld")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _node_line() -> str:
    line = _run(["slurmd", "-C"], check=True).stdout.splitlines()[0]
    return re.sub(r"\s*UpTime=\S+", "", line).strip()


def write_config(d: Path) -> Path:
    node = _node_line()
    name = re.search(r"NodeName=(\S+)", node).group(1)
    for sub in ("state", "spool", "log", "munge"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    conf = d / "slurm.conf"
    conf.write_text(f"""# written by tests/slurm_cluster.py
ClusterName=vlptest
SlurmctldHost={name}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.socket,cred_expire={CRED_EXPIRE_S}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
SchedulerParameters=sched_interval=2
MinJobAge=600
KillWait=30
{node} State=UNKNOWN
PartitionName=debug Nodes={name} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _start_munge(d: Path) -> None:
    m = d / "munge"
    munge = pwd.getpwnam("munge")
    key = m / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(m, 0o700)
    os.chmod(key, 0o400)
    for p in (m, key):
        os.chown(p, munge.pw_uid, munge.pw_gid)
    for p in (d, *d.parents):                   # munged needs to reach its folder
        if p == Path("/"):
            break
        os.chmod(p, os.stat(p).st_mode | 0o011)
    cmd = ["munged", f"--key-file={key}", f"--socket={m}/munge.socket", f"--pid-file={m}/munged.pid",
           f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed", "--force"]
    r = _run(cmd, user=munge.pw_uid, group=munge.pw_gid, timeout=30)
    if r.returncode != 0:
        raise Unavailable(f"munged did not start: {(r.stderr or r.stdout).strip()}")


def env_for(d: Path) -> dict:
    return {**os.environ, "SLURM_CONF": str(d / "slurm.conf")}


def up(d: Path, timeout_s: float = 60) -> dict:
    """Install when needed, write the configuration, start munged, slurmctld and slurmd; returns the client
    environment (SLURM_CONF set). The node is idle when this returns."""
    ensure_installed()
    d = Path(d).resolve()
    d.mkdir(parents=True, exist_ok=True)
    write_config(d)
    _start_munge(d)
    env = env_for(d)
    for daemon in ("slurmctld", "slurmd"):
        r = _run([daemon], env=env, timeout=30)
        if r.returncode != 0:
            down(d)
            raise Unavailable(f"{daemon} did not start: {(r.stderr or r.stdout).strip()}")
    deadline = time.time() + timeout_s
    state = ""
    while time.time() < deadline:
        r = _run(["sinfo", "-h", "-o", "%T"], env=env)
        state = r.stdout.strip()
        if state in ("idle", "mixed", "allocated"):
            return env
        time.sleep(0.5)
    logs = "".join((d / "log" / f).read_text()[-1500:] for f in ("slurmctld.log", "slurmd.log")
                   if (d / "log" / f).is_file())
    down(d)
    raise Unavailable(f"the node did not become idle within {timeout_s:.0f}s (state {state!r}); logs:\n{logs}")


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def down(d: Path) -> None:
    """Stop slurmd, slurmctld and munged by the PIDs in their pid files (never by name)."""
    d = Path(d).resolve()
    for pidfile in (d / "slurmd.pid", d / "slurmctld.pid", d / "munge" / "munged.pid"):
        pid = _pid(pidfile)
        if pid is None:
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def job_info(job: str | int, env: dict) -> dict[str, str]:
    """`scontrol show job -o JOB` as a dict (JobState, Restarts, ExitCode, ...)."""
    out = _run(["scontrol", "show", "job", "-o", str(job)], env=env).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("up", "down"):
        sys.exit("usage: python tests/slurm_cluster.py up|down DIR")
    try:
        if sys.argv[1] == "up":
            up(Path(sys.argv[2]))
            print(f"export SLURM_CONF={Path(sys.argv[2]).resolve() / 'slurm.conf'}")
        else:
            down(Path(sys.argv[2]))
    except Unavailable as e:
        sys.exit(f"error: {e}")
