"""Checkpoint bookkeeping: atomic `latest`, an interrupted save never replaces a good checkpoint, pruning,
resume resolution, consolidated export/load without DeepSpeed (plain-loop checkpoints; the DeepSpeed ZeRO-2/3
paths are exercised in test_engine.py / test_engine_cli.py)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from pretrain import checkpoint as ckpt
from pretrain.config import OptimConfig, PretrainConfig, load_config
from pretrain.optim import build_optimizer, build_scheduler
from pretrain.plain_engine import PlainEngine


def plain_engine(seed: int = 0) -> PlainEngine:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    cfg = OptimConfig(lr=0.1, warmup_steps=1, total_steps=10)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    return PlainEngine(model, opt, build_scheduler(opt, cfg), grad_accum=1, grad_clip=1.0, precision="fp32",
                       device=torch.device("cpu"))


def one_step(engine: PlainEngine) -> None:
    loss = engine(torch.randn(3, 4)).pow(2).mean()
    engine.backward(loss)
    engine.step()


class CrashingEngine:
    """Writes part of a checkpoint, then dies like a job killed mid-save."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest=False):
        assert save_latest is False                  # DeepSpeed must never rewrite `latest` itself
        d = ckpt.Path(save_dir) / tag
        d.mkdir(parents=True)
        (d / ckpt.MODEL_STATES).write_bytes(b"partial")
        raise KeyboardInterrupt("killed during save")


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path):
    engine = plain_engine()
    one_step(engine)
    good = ckpt.save_checkpoint(engine, tmp_path, 1, {"step": 1}, keep=2)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(CrashingEngine(), tmp_path, 2, {"step": 2}, keep=2)
    assert ckpt.read_latest(tmp_path) == good.name == "step_00000001"
    assert ckpt.resolve_resume("latest", tmp_path) == (tmp_path, "step_00000001")
    # the next good save supersedes and removes the partial one
    one_step(engine)
    ckpt.save_checkpoint(engine, tmp_path, 3, {"step": 3}, keep=2)
    assert ckpt.list_tags(tmp_path) == ["step_00000001", "step_00000003"]


def test_latest_is_replaced_atomically(tmp_path, monkeypatch):
    (tmp_path / "step_00000001").mkdir()
    (tmp_path / "step_00000002").mkdir()
    ckpt.write_latest(tmp_path, "step_00000001")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, "replace", boom)
    with pytest.raises(OSError):
        ckpt.write_latest(tmp_path, "step_00000002")
    assert (tmp_path / "latest").read_text() == "step_00000001"   # never truncated or half-written


def test_keep_last_k(tmp_path):
    engine = plain_engine()
    for step in range(1, 6):
        one_step(engine)
        ckpt.save_checkpoint(engine, tmp_path, step, {"step": step}, keep=2)
    assert ckpt.list_tags(tmp_path) == ["step_00000004", "step_00000005"]
    assert ckpt.read_latest(tmp_path) == "step_00000005"


def test_save_load_round_trip_restores_weights_optimizer_schedule_and_rng(tmp_path):
    a = plain_engine()
    for _ in range(3):
        one_step(a)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    ckpt.save_checkpoint(a, tmp_path, 3, {"step": 3, "samples_seen": 9, "epoch": 1, "batch_in_epoch": 2}, keep=1)
    expect_rng = (random.random(), np.random.rand(), torch.rand(1).item())
    x = torch.arange(12.0).reshape(3, 4) / 10
    a.backward(a(x).pow(2).mean())
    a.step()

    b = plain_engine(seed=1)                         # different init: everything must come from the file
    state = ckpt.load_checkpoint(b, *ckpt.resolve_resume("latest", tmp_path))
    assert (state["step"], state["samples_seen"], state["epoch"], state["batch_in_epoch"]) == (3, 9, 1, 2)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect_rng
    assert b.global_steps == 3
    b.backward(b(x).pow(2).mean())
    b.step()
    # the 4th step after loading equals the uninterrupted 4th step: weights, Adam moments and lr all restored
    assert b.get_lr() == a.get_lr()
    for k, v in a.module.state_dict().items():
        assert torch.equal(b.module.state_dict()[k], v), k


def test_export_and_load_consolidated_forms(tmp_path):
    engine = plain_engine()
    one_step(engine)
    run = tmp_path / "run"
    saved = ckpt.save_checkpoint(engine, run / "checkpoints", 1, {"step": 1}, keep=1)
    cfg = load_config(PretrainConfig, None, ["optim.total_steps=1"])
    export = ckpt.export_consolidated(run / "checkpoints", run, cfg)
    assert (export / "model.safetensors").is_file() and (export / "config.yaml").is_file()
    live = engine.module.state_dict()
    for source in (export, export / "model.safetensors", run, run / "checkpoints", saved):
        loaded = ckpt.load_consolidated(source)
        assert set(loaded) == set(live)
        for k in live:
            assert loaded[k].dtype == torch.float32 and torch.equal(loaded[k], live[k]), (source, k)
    fresh = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    fresh.load_state_dict(ckpt.load_consolidated(export))


def test_resume_resolution(tmp_path):
    assert ckpt.resolve_resume(None, tmp_path) is None
    assert ckpt.resolve_resume("latest", tmp_path) is None          # fresh run: nothing yet
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "elsewhere"), tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="not a .safetensors file"):
        ckpt.load_consolidated(tmp_path / "nothing_here")
