"""A bad-input corpus, built here, against every entry point: converters, inspect, loaders, configs, checkpoints,
resume, predict and evaluate. Every case must end in one of four documented ways:

- "error":   exit code 2 (or the entry point's one-line exception) with exactly one line `error: <file or key>: ...`;
- "skip":    the bad record is dropped and counted by reason (manifest, loader counts, evaluate's counters);
- "warned":  the run goes on, correctly, after one warning line (e.g. a dangling `latest` falls back);
- "correct": odd but valid input read the right way (checked against the value it must give).

A traceback or a wrong result fails the case. `test_zz_tally` asserts the totals (tracebacks 0, wrong 0) and
the terminal summary prints them (tests/conftest.py). The cases live in tests/test_bad_inputs_data.py
(converters, writer, inspect, loaders) and tests/test_bad_inputs_runs.py (configs, checkpoints, resume, predict,
evaluate); this module holds the registry, the tally and the builders they share.
"""
from __future__ import annotations

import io
import json
import struct
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from loader_shards import pretrain_record, write_shards
from shards.__main__ import main as shards_main
from shards_testutil import write_jpeg, write_json

ROOT = Path(__file__).resolve().parents[1]
TALLY: Counter = Counter()           # outcome -> cases
INPUT_TALLY: Counter = Counter()     # outcome -> bad inputs
CASES: dict[str, list[tuple[str, Callable]]] = {}    # test module -> its (name, case) pairs
INPUTS: dict[str, int] = {}       # case -> how many distinct bad inputs it tries


def case(n_inputs: int) -> Callable:
    def register(fn: Callable) -> Callable:
        CASES.setdefault(fn.__module__, []).append((fn.__name__, fn))
        INPUTS[fn.__name__] = n_inputs
        return fn
    return register


def summary() -> str:
    t, i = TALLY, INPUT_TALLY
    return (f"bad-input corpus: {sum(t.values())} cases / {sum(i.values())} bad inputs tried: "
            f"{t['error']}/{i['error']} clear errors, {t['skip']}/{i['skip']} counted skips, "
            f"{t['warned']}/{i['warned']} warned and recovered, {t['correct']}/{i['correct']} read correctly, "
            f"{t['traceback']} tracebacks, {t['wrong']} silent wrong results (cases/inputs)")


# ---------------------------------------------------------------------------------------------- helpers
def run_case(name: str, fn: Callable, tmp_path: Path, capsys, request) -> None:
    """Run one registered case and record its outcome (or its failure) in the tally."""
    kwargs = {"tok": request.getfixturevalue("tok")} if "tok" in fn.__code__.co_varnames[:fn.__code__.co_argcount] else {}
    try:
        outcome = fn(tmp_path, capsys, **kwargs)
    except (AssertionError, pytest.fail.Exception):
        TALLY["wrong"] += 1
        INPUT_TALLY["wrong"] += INPUTS[name]
        raise
    except BaseException:
        TALLY["traceback"] += 1
        INPUT_TALLY["traceback"] += INPUTS[name]
        raise
    assert outcome in ("error", "skip", "warned", "correct"), outcome
    TALLY[outcome] += 1
    INPUT_TALLY[outcome] += INPUTS[name]


def run_shards(capsys, *argv: str) -> tuple[int, list[str], str]:
    rc = shards_main(list(argv))
    cap = capsys.readouterr()
    return rc, [ln for ln in cap.err.splitlines() if ln.strip()], cap.out


def one_line_error(rc: int, err: list[str], needle: str) -> str:
    errors = [ln for ln in err if ln.startswith("error: ")]
    assert rc == 2, (rc, err)
    assert len(errors) == 1 and needle in errors[0], err
    assert not any("Traceback" in ln for ln in err), err
    return "error"


def manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def tree(root: Path, skip: Path | None = None) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if skip is None or skip not in p.parents and p != skip}


def jpeg_bytes(w: int = 32, h: int = 24, value: int = 120) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def lying_jpeg(w: int = 9000, h: int = 9000) -> bytes:
    """A small valid JPEG whose SOF header claims w x h (libjpeg pads the rest with grey)."""
    b = bytearray(jpeg_bytes(16, 16))
    i = b.index(b"\xff\xc0")
    b[i + 5:i + 9] = struct.pack(">HH", h, w)
    return bytes(b)


@lru_cache(maxsize=None)
def bomb_png() -> bytes:
    """100 MP of black: above PIL's decompression-bomb limit (89.5 MP), a few hundred kB on disk."""
    buf = io.BytesIO()
    Image.new("1", (10000, 10000)).save(buf, "PNG")
    return buf.getvalue()


def coco_with(tmp: Path, images: list, anns: list) -> tuple[Path, Path]:
    img_dir = tmp / "images"
    for i in (1, 2):
        write_jpeg(img_dir / f"{i:012d}.jpg", 64, 48, seed=i)
    return img_dir, write_json(tmp / "captions.json", {"images": images, "annotations": anns})


def good_images() -> list[dict]:
    return [{"id": i, "file_name": f"{i:012d}.jpg", "width": 64, "height": 48} for i in (1, 2)]


def caption_anns() -> list[dict]:
    return [{"id": 10 + i, "image_id": i, "caption": f"a picture number {i}"} for i in (1, 2)]


def shards_with_bad_image(tmp: Path, bad: bytes) -> Path:
    def record(source, i, rng, **kw):
        rec, jpg = pretrain_record(source, i, rng, **kw)
        return rec, (bad if i == 1 else jpg)
    return write_shards(tmp / "sh", "coco", 1, 4, record=record)
