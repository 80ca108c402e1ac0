"""`python -m pretrain`: the real task + real shards + real loader under torchrun with two gloo processes, and
one-line errors (exit 2, no traceback) for user mistakes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from loader_shards import WORDS, data_cfg, write_shards
from pretrain.checkpoint import load_consolidated
from pretrain.config import PretrainConfig, load_config
from pretrain.task import build_task
from pretrain_tiny import TINY
from shards.text import build_tokenizer, build_vocab_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def cli_env() -> dict:
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        e.pop(k, None)
    return e


def tiny_pretrain_config(tmp_path: Path, **engine) -> Path:
    """TINY model (tests/pretrain_tiny.py) over two tiny shard sets and a WordPiece vocab of the test words."""
    coco = write_shards(tmp_path / "shards" / "coco", "coco", 2, 6, seed=1)
    vg = write_shards(tmp_path / "shards" / "vg", "vg", 2, 6, seed=2)
    build_vocab_tokenizer(WORDS, tmp_path / "tok")
    cfg: dict = {}
    for item in TINY:
        key, value = item.split("=", 1)
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    cfg["model"]["text"]["tokenizer"] = str(tmp_path / "tok")
    cfg["data"].update(data_cfg([{"name": "coco", "shards": str(coco)}, {"name": "vg", "shards": str(vg)}],
                                batches_per_epoch=2))
    cfg["optim"] = {"lr": 1e-3, "warmup_steps": 1, "total_steps": 3}
    cfg["engine"] = {"deepspeed": True, "zero_stage": 2, "precision": "fp32", **engine}
    cfg["run"] = {"out_dir": str(tmp_path / "run"), "log_every": 1, "save_every": 2, "wandb": {"mode": "disabled"}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_torchrun_two_processes_real_task_and_shards(tmp_path):
    config = tiny_pretrain_config(tmp_path, zero_stage=3)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "pretrain", "--config", str(config)], env=cli_env(), capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["world_size"] == 2
    assert summary["final_loss"] == summary["final_loss"] and summary["final_loss"] < 1e4
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows if "loss" in x] == [1, 2, 3]
    assert {"itc", "itm", "mlm", "bbox", "giou", "lr", "samples_per_s_gpu", "data_time"} <= set(rows[-1])
    # the ZeRO-3 export loads into a fresh task without DeepSpeed (what finetune does)
    cfg = load_config(PretrainConfig, tmp_path / "run" / "export" / "config.yaml")
    weights = load_consolidated(tmp_path / "run")
    task = build_task(cfg, len(build_tokenizer(tmp_path / "tok")))
    missing, unexpected = task.load_state_dict(weights, strict=True)
    assert not unexpected and not missing
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert len(weights) == len(task.state_dict()) > 0


def assert_one_line_error(code: int, stderr: str, needle: str) -> None:
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and needle in lines[-1], stderr
    assert sum(ln.startswith("error: ") for ln in lines) == 1


@pytest.mark.slow
def test_missing_config_file_as_a_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pretrain", "--config", str(tmp_path / "nope.yaml")], env=cli_env(),
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert_one_line_error(r.returncode, r.stderr, "config file not found")


@pytest.mark.parametrize("overrides, needle", [
    (["optim.lrate=1"], "unknown config key 'optim.lrate'"),
    (["engine.zero_stage=two"], "engine.zero_stage: expected an integer"),
    (["data.sources=[{name: coco, shards: /no/such_dir}]"], "/no/such_dir"),
    (["model.text.tokenizer=/no/tokenizer_dir", "data.sources=[{name: coco, shards: SHARDS}]"], "/no/tokenizer_dir"),
])
def test_user_mistakes_are_one_line_errors(overrides, needle, capsys, tmp_path):
    from pretrain.__main__ import main

    shards = write_shards(tmp_path / "coco", "coco", 1, 2)
    overrides = [o.replace("SHARDS", str(shards)) for o in overrides]
    code = main(["--config", str(ROOT / "configs" / "pretrain" / "smoke.yaml"), *overrides])
    assert_one_line_error(code, capsys.readouterr().err, needle)
