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
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pretrain import distributed as du
from pretrain.config import save_config
from pretrain.safe_load import CheckpointError, load_pt, weights_only_loads

TAG_RE = re.compile(r"^step_(\d{8,})$")
MODEL_STATES = "mp_rank_00_model_states.pt"
COMPLETE = "complete"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """This process's RNG states as tensors and plain data only (so `load_pt` reads them with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- latest pointer
def read_latest(ckpt_dir: str | Path) -> str | None:
    """The tag `latest` names when that tag is a complete checkpoint, else None (see `resume_candidates`)."""
    tag, problem = _pointer(ckpt_dir)
    return tag if problem is None else None


def _pointer(ckpt_dir: str | Path) -> tuple[str | None, str | None]:
    """(tag, None) when `latest` names a complete checkpoint; (None, "absent") without a pointer file;
    otherwise (None, what is wrong with it)."""
    d = Path(ckpt_dir)
    p = d / "latest"
    if not p.exists():
        return None, "absent"
    try:
        tag = p.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        return None, f"unreadable ({type(e).__name__})"
    if not tag:
        return None, "empty"
    if not TAG_RE.match(tag):
        return None, f"names {tag[:60]!r}, not a step_XXXXXXXX checkpoint"
    if not (d / tag).is_dir():
        return None, f"names {tag}, which does not exist"
    if not is_complete(d, tag):
        return None, f"names {tag}, which is partial (no '{COMPLETE}' marker)"
    return tag, None


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


def prune(ckpt_dir: str | Path, keep: int, protect: tuple[str, ...] = ()) -> list[str]:
    """Delete all tags but the newest `keep` complete ones, `latest` and `protect` (the checkpoint this run
    resumed from); partial tags of killed saves go too. Call only between saves (rank 0, after `latest` moved)."""
    latest = read_latest(ckpt_dir)
    if latest is None:
        return []
    tags = list_tags(ckpt_dir)
    complete = [t for t in tags if is_complete(ckpt_dir, t)]
    keep_set = set(complete[-keep:]) | {latest} | set(protect)
    removed = [t for t in tags if t not in keep_set]
    for t in removed:
        shutil.rmtree(Path(ckpt_dir) / t, ignore_errors=True)
    return removed


# ---------------------------------------------------------------------------------------------- save / load
def save_checkpoint(engine: Any, ckpt_dir: str | Path, step: int, client_state: dict, keep: int,
                    protect: tuple[str, ...] = ()) -> Path:
    """Collective: every rank calls it. `engine` is a DeepSpeedEngine or a PlainEngine (same methods).
    `protect` names tags pruning must keep (the one this run resumed from)."""
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
        prune(ckpt_dir, keep, protect)
    du.barrier()
    return ckpt_dir / tag


def du_rank() -> int:
    return torch.distributed.get_rank() if du.is_dist() else 0


def resume_candidates(resume: str | None, ckpt_dir: str | Path,
                      warn: Callable[[str], None] | None = None) -> list[tuple[Path, str]]:
    """Checkpoints to try, best first, as (checkpoints dir, tag); [] for a fresh start.

    `latest` means this run's checkpoints dir; a path may name a checkpoints dir, a run dir holding
    `checkpoints/`, or one step_XXXXXXXX dir. The tag `latest` names comes first; when the pointer is empty,
    unreadable or names a missing or partial tag, the newest complete tags come instead, after a warning.
    No pointer and no complete tag is a fresh start (for `latest`) or an error (for a path); a bad pointer
    with no complete tag to fall back to is an error. Older complete tags follow as fall-backs for a
    checkpoint that turns out to be unreadable."""
    warn = warn or _warn
    if resume is None or resume == "":
        return []
    if resume == "latest":
        d = Path(ckpt_dir)
    else:
        p = Path(resume)
        if p.is_dir() and TAG_RE.match(p.name):
            if not is_complete(p.parent, p.name):
                raise CheckpointError(p, f"run.resume names a partial checkpoint (no '{COMPLETE}' marker)")
            return [(p.parent, p.name)]
        d = p / "checkpoints" if (p / "checkpoints").is_dir() and not (p / "latest").exists() else p
        if not d.is_dir():
            raise CheckpointError(p, "run.resume: no such checkpoint directory (expected a checkpoints dir with "
                                     "'latest', a run dir or a step_XXXXXXXX dir)")
    complete = [t for t in reversed(list_tags(d)) if is_complete(d, t)]
    tag, problem = _pointer(d)
    if tag is not None:
        return [(d, tag)] + [(d, t) for t in complete if t != tag]
    if not complete:
        if problem == "absent" and resume == "latest":
            return []
        what = "no 'latest' pointer" if problem == "absent" else f"'latest' {problem}"
        raise CheckpointError(d / "latest" if problem != "absent" else d,
                              f"{what} and no complete checkpoint to fall back to")
    warn(f"warning: {d / 'latest'}: {'missing' if problem == 'absent' else problem}; resuming from the newest "
         f"complete checkpoint {complete[0]}")
    return [(d, t) for t in complete]


def resolve_resume(resume: str | None, ckpt_dir: str | Path) -> tuple[Path, str] | None:
    """The first of `resume_candidates`, or None for a fresh start."""
    c = resume_candidates(resume, ckpt_dir)
    return c[0] if c else None


def _warn(msg: str) -> None:
    if du_rank() == 0:
        print(msg, file=sys.stderr, flush=True)


CLIENT_KEYS = ("step", "samples_seen", "epoch", "batch_in_epoch")


def load_checkpoint(engine: Any, ckpt_dir: str | Path, tag: str, warn: Callable[[str], None] | None = None) -> dict:
    """Load weights/optimizer/schedule into `engine`, restore this rank's RNG; returns the client state.

    Every file is read with `weights_only=True` (`pretrain.safe_load`). A missing data position is an error;
    a missing RNG file a loud warning (the run continues, but not bit-exactly) and `client_state["rng_restored"]`
    is False."""
    warn = warn or _warn
    tag_dir = Path(ckpt_dir) / tag
    with weights_only_loads():
        try:
            load_path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        except CheckpointError:
            raise
        except (RuntimeError, KeyError, ValueError, TypeError, OSError, AssertionError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(tag_dir, f"cannot be loaded into this model ({type(e).__name__}: {first[:200]})") from None
    if load_path is None:
        raise CheckpointError(tag_dir / MODEL_STATES, "missing or unreadable")
    state = dict(client_state or {})
    missing = [k for k in CLIENT_KEYS if not isinstance(state.get(k), int)]
    if missing:
        raise CheckpointError(tag_dir / MODEL_STATES, f"holds no data position ({', '.join(missing)} missing)")
    rng_file = tag_dir / f"rng_rank{du_rank()}.pt"
    if rng_file.is_file():
        rng = load_pt(rng_file)
        try:
            set_rng_state(rng)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(rng_file, f"not an RNG state ({type(e).__name__}: {e})") from None
        state["rng_restored"] = True
    else:
        print(f"WARNING: {rng_file}: missing; the RNG state is not restored, so this resumed run will not "
              f"repeat the uninterrupted run exactly", file=sys.stderr, flush=True)
        state["rng_restored"] = False
    return state


# ---------------------------------------------------------------------------------------------- consolidated
def consolidated_state_dict(ckpt_dir: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """fp32 task weights from a checkpoint dir written by save_checkpoint (any ZeRO stage, or the plain loop)."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag or read_latest(ckpt_dir)
    if tag is None:
        raise CheckpointError(ckpt_dir, "no complete checkpoint that 'latest' names")
    tag_dir = ckpt_dir / tag
    if any(tag_dir.glob("*optim_states.pt")):   # ZeRO 1-3 (and bf16) keep the fp32 master copy here
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        with weights_only_loads():
            try:
                sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
            except CheckpointError:
                raise
            except (RuntimeError, KeyError, ValueError, TypeError, OSError, AssertionError, IndexError) as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise CheckpointError(tag_dir, f"not a readable DeepSpeed checkpoint ({first[:200]})") from None
    else:
        states = load_pt(tag_dir / MODEL_STATES)
        sd = states.get("module") if isinstance(states, dict) else None
        if not isinstance(sd, dict):
            raise CheckpointError(tag_dir / MODEL_STATES, "holds no 'module' state dict")
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
    """Task weights from an export dir, a run dir, a .safetensors file or a DeepSpeed checkpoint dir.
    Nothing here unpickles with `weights_only=False`; bad files are `CheckpointError`s (one line)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        return read_safetensors(p)
    for cand in (p / "model.safetensors", p / "export" / "model.safetensors"):
        if cand.is_file():
            return read_safetensors(cand)
    if p.is_dir() and (p / "latest").is_file():
        return consolidated_state_dict(p)
    if p.is_dir() and TAG_RE.match(p.name):
        return consolidated_state_dict(p.parent, p.name)
    if (p / "checkpoints" / "latest").is_file():
        return consolidated_state_dict(p / "checkpoints")
    raise CheckpointError(p, "not a .safetensors file, an export dir or a checkpoint dir")


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """`safetensors.torch.load_file` with one-line errors for truncated or corrupt files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(path, f"not a readable safetensors file ({str(e).splitlines()[0][:200]})") from None
