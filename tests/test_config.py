"""Typed config: YAML + dotted overrides, unknown keys and wrong types named, global batch identity."""
from pathlib import Path

import pytest

from pretrain.config import ConfigError, PretrainConfig, load_config, save_config
from pretrain.ds_config import build_ds_config, plan_batch

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_then_overrides(tmp_path):
    p = write(tmp_path, "optim:\n  lr: 3e-4\ndata:\n  batch_size: 8\n")
    cfg = load_config(PretrainConfig, p, ["optim.lr=2e-4", "data.batch_size=64", "engine.zero_stage=3",
                                          "run.wandb.mode=disabled", "optim.betas=[0.9, 0.95]"])
    assert cfg.optim.lr == pytest.approx(2e-4)
    assert cfg.data.batch_size == 64
    assert cfg.engine.zero_stage == 3
    assert cfg.run.wandb.mode == "disabled"
    assert cfg.optim.betas == [0.9, 0.95]
    assert cfg.optim.weight_decay == 0.01          # untouched default


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(PretrainConfig, None, ["optim.total_steps=7", "model.text.num_layers=2"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(PretrainConfig, tmp_path / "config.yaml")
    assert again == cfg


@pytest.mark.parametrize("override, needle", [
    (["optim.lrr=1"], "optim.lrr"),
    (["engine.stage=2"], "engine.stage"),
    (["run.wandb.bogus=1"], "run.wandb.bogus"),
])
def test_unknown_keys_are_named(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(PretrainConfig, None, override)


@pytest.mark.parametrize("override, needle", [
    (["optim.total_steps=many"], "optim.total_steps: expected an integer"),
    (["engine.deepspeed=3"], "engine.deepspeed: expected true/false"),
    (["optim.lr=fast"], "optim.lr: expected a number"),
    (["engine.zero_stage=4"], "engine.zero_stage"),
    (["engine.precision=fp8"], "engine.precision"),
    (["optim.schedule=exp"], "optim.schedule"),
    (["run.save_every=0"], "run.save_every"),
    (["engine.offload_params=true", "engine.zero_stage=2"], "zero_stage=3"),
])
def test_wrong_types_and_values_are_named(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(PretrainConfig, None, override)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(PretrainConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(PretrainConfig, write(tmp_path, "optim: [1,\n"))


@pytest.mark.parametrize("micro, world, accum, global_batch", [(8, 1, 1, None), (8, 4, 3, None),
                                                             (16, 8, None, 1024), (32, 32, None, 1024)])
def test_global_batch_identity(micro, world, accum, global_batch):
    over = [f"engine.grad_accum={accum}"] if accum else [f"engine.global_batch_size={global_batch}"]
    cfg = load_config(PretrainConfig, None, over)
    plan = plan_batch(micro, world, cfg.engine)
    ds = build_ds_config(cfg.engine, cfg.optim, plan)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
    assert ds["train_micro_batch_size_per_gpu"] == micro
    if global_batch:
        assert ds["train_batch_size"] == global_batch
    else:
        assert ds["gradient_accumulation_steps"] == accum


def test_global_batch_not_divisible_is_a_config_error():
    cfg = load_config(PretrainConfig, None, ["engine.global_batch_size=1000"])
    with pytest.raises(ConfigError, match="not a multiple"):
        plan_batch(64, 8, cfg.engine)


def test_ds_config_follows_engine_section():
    cfg = load_config(PretrainConfig, None, ["engine.zero_stage=3", "engine.precision=bf16",
                                             "engine.offload_optimizer=true", "engine.activation_checkpointing=true",
                                             "optim.grad_clip=0.5"])
    ds = build_ds_config(cfg.engine, cfg.optim, plan_batch(4, 2, cfg.engine))
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == 0.5
    assert "optimizer" not in ds and "scheduler" not in ds    # torch AdamW + LambdaLR are passed in
    assert "activation_checkpointing" in ds


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "pretrain").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_pretrain_configs_load(path):
    cfg = load_config(PretrainConfig, path)
    assert cfg.optim.total_steps >= 1
