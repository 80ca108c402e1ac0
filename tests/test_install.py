"""The install path the README gives (`pip install -e .`): every third-party module the packages and benchmarks
import is a declared dependency; the smoke commands run on what `python -m shards demo` writes (shards and
tokenizer, no other download); bench/loader.py runs without simplejpeg; shards.demo does not import the CLI."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline"}


def imported_modules() -> dict[str, str]:
    """Top-level module -> first file importing it, over shards/, pretrain/, finetune/ and bench/."""
    found: dict[str, str] = {}
    for d in ("shards", "pretrain", "finetune", "bench"):
        for f in sorted((ROOT / d).rglob("*.py")):
            for n in ast.walk(ast.parse(f.read_text())):
                names = [a.name for a in n.names] if isinstance(n, ast.Import) else \
                    [n.module] if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module else []
                for name in names:
                    found.setdefault(name.split(".")[0], str(f.relative_to(ROOT)))
    return found


def test_every_imported_distribution_is_a_declared_dependency():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}
    dists = packages_distributions()
    ours = {"shards", "pretrain", "finetune", "bench", "__future__"}
    ours |= {p.stem for p in (ROOT / "bench").glob("*.py")}             # bench scripts import each other
    missing = {}
    for mod, where in imported_modules().items():
        if mod in sys.stdlib_module_names or mod in ours:
            continue
        names = {d.lower().replace("_", "-") for d in dists.get(mod, [mod])}
        if not names & declared:
            missing[mod] = where
    assert missing == {}, f"imported but not in pyproject's dependencies: {missing}"


def test_shards_demo_does_not_import_the_cli():
    r = subprocess.run([sys.executable, "-c", "import sys, shards.demo; print('shards.__main__' in sys.modules)"],
                       env=env(), capture_output=True, text=True, cwd=ROOT)
    assert r.stdout.strip() == "False", r.stderr


@pytest.mark.slow
def test_readme_smoke_commands_run_on_what_shards_demo_writes(tmp_path):
    """From an empty folder: `python -m shards demo --out runs/demo`, then the smoke pretraining and the smoke
    fine-tuning from it, with the configs as they are (their relative paths resolve in that folder)."""
    def run(*args: str) -> str:
        r = subprocess.run([sys.executable, *args], env=env(), capture_output=True, text=True, cwd=tmp_path,
                           timeout=600)
        assert r.returncode == 0, f"{args}: {r.stderr[-3000:]}"
        return r.stdout

    run("-m", "shards", "demo", "--out", "runs/demo", "--images", "48")
    assert (tmp_path / "runs/demo/tokenizer/vocab.txt").is_file()
    run("-m", "pretrain", "--config", str(ROOT / "configs/pretrain/smoke.yaml"))
    assert (tmp_path / "runs/smoke/pretrain/export/model.safetensors").is_file()
    run("-m", "finetune", "--config", str(ROOT / "configs/finetune/smoke.yaml"), "init_from=runs/smoke/pretrain")
    assert (tmp_path / "runs/smoke/finetune/eval.json").is_file()


@pytest.mark.slow
def test_bench_loader_runs_without_simplejpeg():
    code = ("import runpy, sys; sys.modules['simplejpeg'] = None; "
            "sys.argv = ['bench/loader.py', '--images', '48', '--decode-seconds', '0.05', '--batches', '2', "
            "'--batch-size', '8']; runpy.run_path('bench/loader.py', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["decoder"] == "pil" and result["decoders"]["simplejpeg"].startswith("unavailable")
    code = code.replace("'--batch-size', '8'", "'--batch-size', '8', '--decoder', 'simplejpeg'")
    r = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --decoder simplejpeg but simplejpeg is not installed (pip install simplejpeg)"]
