"""Loading `.pt` files that cannot run code: `torch.load(weights_only=True)` everywhere a path can come from a user.

`load_pt(path)` is the one way this package reads a pickle-based checkpoint file (the plain loop's
`mp_rank_00_model_states.pt`, the per-rank RNG states, DeepSpeed's model and optimizer states). It loads with
`weights_only=True`, which rebuilds tensors and plain containers only, plus an explicit allowlist of the
inert classes DeepSpeed's optimizer states hold (an enum, a dataclass, the loss-scaler's attribute bag) and
numpy's array reconstruction (RNG states of older checkpoints). A pickle that names any other global (a
crafted file calling `os.system`, say) is refused before anything is called: `CheckpointError`, one line.

DeepSpeed reads its own checkpoint directories with `weights_only=False` (its checkpoint engine and
`zero_to_fp32`). `weights_only_loads()` routes every `torch.load` made inside it through `load_pt`; resuming
(`engine.load_checkpoint`) and consolidating a ZeRO checkpoint (`get_fp32_state_dict_from_zero_checkpoint`)
run inside it, so a DeepSpeed directory is read through the same safe path. The consolidated export
(`export/model.safetensors`) holds tensors only and needs none of this.
"""
from __future__ import annotations

import contextlib
import pickle
import re
import threading
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch

from shards.inputs import InputError


class CheckpointError(InputError):
    """A checkpoint file that is missing, unreadable or unsafe; str() is `<file>: <problem>`."""


def _allowed_globals() -> list:
    import numpy as np

    allowed: list = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), type(np.dtype(np.float64))]
    try:
        allowed.append(np._core.multiarray._reconstruct)
    except AttributeError:                       # numpy < 2
        allowed.append(np.core.multiarray._reconstruct)
    try:                                         # DeepSpeed's optimizer states: inert data classes
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
        allowed += [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]
    except Exception:  # noqa: BLE001 - DeepSpeed absent or moved: its files then fail as "unsafe", never run code
        pass
    return allowed


_ORIGINAL_LOAD = torch.load


def load_pt(path: str | Path | Any, map_location: Any = "cpu", **kwargs: Any) -> Any:
    """`torch.load(path, weights_only=True)` with the allowlist above; CheckpointError on any failure."""
    kwargs.pop("weights_only", None)
    name = str(path) if isinstance(path, (str, Path)) else getattr(path, "name", "<checkpoint stream>")
    if isinstance(path, (str, Path)) and not Path(path).is_file():
        raise CheckpointError(name, "no such file" if not Path(path).exists() else "not a file")
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return _ORIGINAL_LOAD(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        text = str(e)
        m = re.search(r"GLOBAL ([\w.]+)", text)
        if m:
            raise CheckpointError(name, f"refused: the pickle names {m.group(1)} (only tensors and plain data load; "
                                        f"weights_only=True)") from None
        detail = next((ln.strip() for ln in text.splitlines() if ln.strip().startswith("Unsupported")),
                      (text.strip().splitlines() or [type(e).__name__])[-1])
        raise CheckpointError(name, f"not a readable checkpoint ({detail[:200]})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, AttributeError,
            TypeError, UnicodeDecodeError, MemoryError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(name, f"not a readable checkpoint (truncated or corrupt: {first[:200]})") from None


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside: every `torch.load` (DeepSpeed's included) is `load_pt`, whatever `weights_only` it asks for."""
    def patched(f: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("weights_only", None)
        return load_pt(f, map_location=map_location if map_location is not None else "cpu", *args, **kwargs)

    with _PATCH_LOCK:
        torch.load = patched
        try:
            yield
        finally:
            torch.load = _ORIGINAL_LOAD
