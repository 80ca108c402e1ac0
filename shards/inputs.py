"""Reading user-supplied files with one-line errors: ``InputError`` is what the CLI turns into exit code 2."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any


class InputError(Exception):
    """A user mistake (missing file, malformed JSON, wrong format); str() is ``<file>: <problem>``."""

    def __init__(self, path: str | Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = str(path), problem


def require_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "no such file" if not p.exists() else "not a file")
    return p


def require_dir(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise InputError(p, "no such directory" if not p.exists() else "not a directory")
    return p


def load_json(path: str | Path, expect: type = dict) -> Any:
    """Load a JSON file whose top level must be ``expect`` (dict or list)."""
    p = require_file(path)
    try:
        with open(p, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(p, f"malformed JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError:
        raise InputError(p, "malformed JSON (not UTF-8 text)") from None
    if not isinstance(data, expect):
        raise InputError(p, f"expected a JSON {_name(expect)} at the top level, found a {_name(type(data))}")
    return data


def require_keys(path: str | Path, obj: Any, keys: tuple[str, ...], where: str) -> None:
    """Raise unless ``obj`` is a dict holding every key in ``keys``; ``where`` names it, e.g. ``images[3]``."""
    if not isinstance(obj, dict):
        raise InputError(path, f"{where} is a {_name(type(obj))}, expected an object")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise InputError(path, f"{where} lacks key(s) {', '.join(repr(k) for k in missing)}")


def require_list(path: str | Path, obj: Any, key: str) -> list:
    """``obj[key]`` as a list, or an InputError naming the key."""
    v = obj.get(key) if isinstance(obj, dict) else None
    if key not in obj:
        raise InputError(path, f"missing top-level key {key!r}")
    if not isinstance(v, list):
        raise InputError(path, f"{key!r} is a {_name(type(v))}, expected a list")
    return v


def _name(t: type) -> str:
    return {dict: "object", list: "list", str: "string", int: "number", float: "number",
            type(None): "null", bool: "boolean"}.get(t, t.__name__)


def writable_dir(path: str | Path, what: str = "output directory") -> Path:
    """Create ``path`` (and parents) if needed and check that files can be created in it; InputError otherwise."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InputError(p, f"{what} is a file, not a directory") from None
    except OSError as e:
        raise InputError(p, f"cannot create the {what} ({e.strerror or type(e).__name__})") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise InputError(p, f"{what} is not writable")
    return p


def write_text_file(path: str | Path, text: str) -> None:
    """Write an output file (parents created); InputError naming it when that is impossible."""
    p = Path(path)
    writable_dir(p.parent if str(p.parent) else ".", "folder of the output file")
    try:
        p.write_text(text, encoding="utf-8")
    except OSError as e:
        raise InputError(p, f"cannot write ({e.strerror or type(e).__name__})") from None


def inside(root: str | Path, rel: str) -> Path | None:
    """``root / rel`` when ``rel`` is a relative path that stays inside ``root`` (no absolute path, no ``..``
    climbing out, no NUL); None otherwise. Lexical, so symlinked image folders keep working."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        return None
    norm = os.path.normpath(rel.replace("\\", "/"))
    if os.path.isabs(norm) or norm == ".." or norm.startswith("../") or norm == ".":
        return None
    return Path(root) / norm


SPLIT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def is_plain_name(name: object) -> bool:
    """A split or folder name from data that may become a directory: a plain identifier (train, val, testA)."""
    return isinstance(name, str) and len(name) <= 64 and SPLIT_NAME.fullmatch(name) is not None


def is_int(v: Any) -> bool:
    """A JSON integer (not a bool, not 1.5, not "1")."""
    return isinstance(v, int) and not isinstance(v, bool)


def require_int(path: str | Path, obj: dict, key: str, where: str, *, positive: bool = False) -> int:
    """``obj[key]`` as an int, or an InputError naming the record and the field."""
    v = obj.get(key)
    if not is_int(v) or (positive and v <= 0):
        kind = "a positive integer" if positive else "an integer"
        raise InputError(path, f"{where}: {key} {v!r:.40} is not {kind}")
    return v
