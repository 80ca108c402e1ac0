"""Reading user-supplied files with one-line errors: ``InputError`` is what the CLI turns into exit code 2."""
from __future__ import annotations

import json
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
