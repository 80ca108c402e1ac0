"""Checkpoints that survive preemption, `resume: latest`, and consolidated exports.

Layout under `run.out_dir/checkpoints/`:
    step_00001000/            one DeepSpeed checkpoint tag (or the plain loop's equivalent), plus
        rng_rank{r}.pt        every rank's RNG states (DeepSpeed keeps client_state from rank 0 only)
        complete              written once every rank has finished writing this tag
    latest                    the tag of the newest complete checkpoint

DeepSpeed writes its own `latest` by truncating and rewriting the file in place, so a job killed at that
moment leaves it empty. We save with `save_latest=False`, wait until every rank has finished writing the
tag, mark the tag `complete`, and only then replace `latest` atomically (write a temp file, fsync,
`os.replace`). An interrupted save therefore leaves a partial tag directory without the marker that nothing
points to, and the previous checkpoint stays current; the next save removes it. Only the newest `keep`
complete tags are kept.

`export_consolidated` writes `out_dir/export/model.safetensors` (fp32 task weights, also from ZeRO-3) and
`config.yaml`, which `finetune` loads with `load_consolidated` and no DeepSpeed.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain import distributed as du
from pretrain.config import save_config

TAG_RE = re.compile(r"^step_(\d{8,})$")
MODEL_STATES = "mp_rank_00_model_states.pt"
COMPLETE = "complete"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- latest pointer
def read_latest(ckpt_dir: str | Path) -> str | None:
    p = Path(ckpt_dir) / "latest"
    if not p.is_file():
        return None
    tag = p.read_text().strip()
    return tag if tag and (Path(ckpt_dir) / tag).is_dir() else None


def write_latest(ckpt_dir: str | Path, tag: str) -> None:
    """Atomically point `latest` at `tag` (readers see the old or the new tag, never an empty file)."""
    p = Path(ckpt_dir) / "latest"
    tmp = p.with_name(f".latest.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    try:                                    # make the rename itself durable
        fd = os.open(str(ckpt_dir), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def list_tags(ckpt_dir: str | Path) -> list[str]:
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    return sorted((p.name for p in d.iterdir() if p.is_dir() and TAG_RE.match(p.name)),
                  key=lambda n: int(TAG_RE.match(n).group(1)))


def is_complete(ckpt_dir: str | Path, tag: str) -> bool:
    return (Path(ckpt_dir) / tag / COMPLETE).is_file()


def prune(ckpt_dir: str | Path, keep: int) -> list[str]:
    """Delete all tags but the newest `keep` complete ones (and `latest`); partial tags of killed saves go too.
    Call only between saves (rank 0, after `latest` moved)."""
    latest = read_latest(ckpt_dir)
    if latest is None:
        return []
    tags = list_tags(ckpt_dir)
    complete = [t for t in tags if is_complete(ckpt_dir, t)]
    keep_set = set(complete[-keep:]) | {latest}
    removed = [t for t in tags if t not in keep_set]
    for t in removed:
        shutil.rmtree(Path(ckpt_dir) / t, ignore_errors=True)
    return removed


# ---------------------------------------------------------------------------------------------- save / load
def save_checkpoint(engine: Any, ckpt_dir: str | Path, step: int, client_state: dict, keep: int) -> Path:
    """Collective: every rank calls it. `engine` is a DeepSpeedEngine or a PlainEngine (same methods)."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    if du_rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if (ckpt_dir / tag).exists() and read_latest(ckpt_dir) != tag:
            shutil.rmtree(ckpt_dir / tag)   # leftovers of a save killed earlier at this step
    du.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), ckpt_dir / tag / f"rng_rank{du_rank()}.pt")
    du.barrier()                            # every rank's files are on disk before the tag counts
    if du_rank() == 0:
        (ckpt_dir / tag / COMPLETE).write_text(f"step {step}\n")
        write_latest(ckpt_dir, tag)
        prune(ckpt_dir, keep)
    du.barrier()
    return ckpt_dir / tag


def du_rank() -> int:
    return torch.distributed.get_rank() if du.is_dist() else 0


def resolve_resume(resume: str | None, ckpt_dir: str | Path) -> tuple[Path, str] | None:
    """(checkpoint dir, tag) to resume from, or None. `latest` means this run's newest complete checkpoint;
    a path may name a checkpoints dir (uses its `latest`) or one tag dir inside it."""
    if resume is None or resume == "":
        return None
    if resume == "latest":
        tag = read_latest(ckpt_dir)
        return (Path(ckpt_dir), tag) if tag else None
    p = Path(resume)
    if (p / "latest").is_file() and read_latest(p):
        return p, read_latest(p)
    if p.is_dir() and TAG_RE.match(p.name):
        return p.parent, p.name
    raise FileNotFoundError(f"run.resume: no checkpoint at {p} (expected a checkpoints dir with 'latest' or a "
                            f"step_XXXXXXXX dir)")


def load_checkpoint(engine: Any, ckpt_dir: str | Path, tag: str) -> dict:
    """Load weights/optimizer/schedule into `engine`, restore this rank's RNG; returns the client state."""
    load_path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if load_path is None:
        raise RuntimeError(f"could not load checkpoint {Path(ckpt_dir) / tag}")
    rng_file = Path(ckpt_dir) / tag / f"rng_rank{du_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return dict(client_state or {})


# ---------------------------------------------------------------------------------------------- consolidated
def consolidated_state_dict(ckpt_dir: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """fp32 task weights from a checkpoint dir written by save_checkpoint (any ZeRO stage, or the plain loop)."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag or read_latest(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"{ckpt_dir}: no 'latest' checkpoint")
    tag_dir = ckpt_dir / tag
    if any(tag_dir.glob("*optim_states.pt")):   # ZeRO 1-3 (and bf16) keep the fp32 master copy here
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:
        states = torch.load(tag_dir / MODEL_STATES, map_location="cpu", weights_only=False)
        sd = states["module"]
    return {k: v.detach().float().contiguous().clone() if v.is_floating_point() else v.contiguous().clone()
            for k, v in sd.items()}


def export_consolidated(ckpt_dir: str | Path, out_dir: str | Path, cfg: Any = None, tag: str | None = None) -> Path:
    """Write out_dir/export/{model.safetensors, config.yaml} from a saved checkpoint (rank 0 only)."""
    from safetensors.torch import save_file

    export = Path(out_dir) / "export"
    export.mkdir(parents=True, exist_ok=True)
    sd = consolidated_state_dict(ckpt_dir, tag)
    tmp = export / "model.safetensors.tmp"
    save_file(sd, str(tmp), metadata={"format": "pt", "source": str(Path(ckpt_dir) / (tag or read_latest(ckpt_dir)))})
    os.replace(tmp, export / "model.safetensors")
    if cfg is not None:
        save_config(cfg, export / "config.yaml")
    return export


def load_consolidated(path: str | Path) -> dict[str, torch.Tensor]:
    """Task weights from an export dir, a run dir, a .safetensors file or a DeepSpeed checkpoint dir."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        return load_file(str(p))
    for cand in (p / "model.safetensors", p / "export" / "model.safetensors"):
        if cand.is_file():
            return load_file(str(cand))
    if p.is_dir() and (p / "latest").is_file():
        return consolidated_state_dict(p)
    if p.is_dir() and TAG_RE.match(p.name):
        return consolidated_state_dict(p.parent, p.name)
    if (p / "checkpoints" / "latest").is_file():
        return consolidated_state_dict(p / "checkpoints")
    raise FileNotFoundError(f"{p}: not a .safetensors file, an export dir or a checkpoint dir")
