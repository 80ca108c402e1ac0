"""Distributed start-up: rank discovery from SLURM or torchrun variables, process-group init, small helpers.

`srun python -m pretrain ...` (one task per GPU) and `torchrun --nproc_per_node N -m pretrain ...` both end in
the same `init_process_group(env://)`: SLURM variables are translated into the torchrun ones (RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) when those are not already set. Without CUDA the backend
is gloo and DeepSpeed is told to use its CPU accelerator (`DS_ACCELERATOR=cpu`), which must happen before
deepspeed is first imported.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    source: str                             # "torchrun" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def parse_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list ("gpu[01-03,07],cpu5") into host names, like `scontrol show hostnames`."""
    hosts: list[str] = []
    # split on commas that are not inside brackets
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-", 1)
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{r}{suffix}")
    return hosts


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list; asks `scontrol show hostnames` when available, else parses it."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    return parse_nodelist(nodelist)[0]


def slurm_port(job_id: str | None) -> int:
    """A per-job port so two jobs sharing a node do not collide (open_clip/torchrun convention)."""
    if not job_id or not job_id.isdigit():
        return DEFAULT_PORT
    return 15000 + int(job_id) % 20000


def discover(env: dict | None = None) -> DistInfo:
    """Rank/world/master from torchrun variables, else SLURM variables, else a single process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]),
                        env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", DEFAULT_PORT)), "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        addr = env.get("MASTER_ADDR") or first_host(nodelist)
        port = int(env.get("MASTER_PORT") or slurm_port(env.get("SLURM_JOB_ID")))
        return DistInfo(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]),
                        addr, port, "slurm")
    return DistInfo(0, 0, 1, "127.0.0.1", int(env.get("MASTER_PORT") or DEFAULT_PORT), "single")


def free_ports(n: int) -> list[int]:
    """n different free TCP ports on 127.0.0.1 (all sockets held open while choosing, so they differ): one per
    process group started side by side on one machine."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


def use_cuda() -> bool:
    return torch.cuda.is_available()


def prepare_deepspeed_env() -> None:
    """Select DeepSpeed's CPU accelerator when there is no GPU; must run before `import deepspeed`."""
    if not use_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init_distributed(timeout_s: int = 1800) -> tuple[DistInfo, torch.device]:
    """Initialise torch.distributed when there is more than one rank; return (info, device for this rank)."""
    info = discover()
    prepare_deepspeed_env()
    if use_cuda():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if info.source == "single" and "MASTER_PORT" not in os.environ:
        # one process still gets a (world-size-1) process group from DeepSpeed: never collide on 29500
        info = dataclasses.replace(info, master_port=free_port())
    # DeepSpeed and env:// read these; export the discovered values for both launchers.
    os.environ.update(RANK=str(info.rank), LOCAL_RANK=str(info.local_rank), WORLD_SIZE=str(info.world_size),
                      MASTER_ADDR=info.master_addr, MASTER_PORT=str(info.master_port))
    if info.world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda() else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=device if use_cuda() else None)
    return info, device


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_dist():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when `flag` is true on any rank (all ranks get the same answer)."""
    if not is_dist():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_ranks(flag: bool, device: torch.device) -> bool:
    """True only when `flag` is true on every rank."""
    return not any_rank(not flag, device)


def cleanup(synchronize: bool = False) -> None:
    """Leave the process group (every rank, before the interpreter exits). Without it, gloo's and the store's
    C++ threads are still running when the process ends and a rank can abort at exit ("terminate called without
    an active exception", exit -6) after a run that succeeded. `synchronize` first waits for every rank, so rank 0
    (which hosts the store) does not tear it down under a rank still finishing; only on paths every rank takes."""
    if is_dist():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()
