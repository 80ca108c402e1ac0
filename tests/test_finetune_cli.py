"""Fine-tuning configs, initialisation from a pretraining export, and the train -> evaluate -> predict CLIs."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from finetune.checkpoint import adopt_pretrained_architecture, load_pretrained
from finetune.config import FinetuneConfig, load_config
from finetune.task import build_task
from loader_shards import WORDS, grounding_record, write_shards
from pretrain.config import ConfigError, from_dict, save_config
from pretrain_tiny import tiny_cfg
from shards.text import build_vocab_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FT = {"model": {"window_size": 2, "global_blocks": [1, 3], "law_groups": 8, "law_reduction": 4, "law_rank": 8,
                "lap_dim": 16, "head_hidden": 32, "res_hidden": 16,
                "mask_grounding": {"dim": 32, "heads": 4, "depth": 1}},
      "data": {"image_size": 64, "max_len": 12, "batch_size": 4, "num_workers": 0}}


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "finetune").glob("*.yaml")), ids=lambda p: p.name)
def test_configs_load(path):
    cfg = load_config(FinetuneConfig, path)
    assert cfg.model.vision.img_size == cfg.data.image_size
    assert cfg.optim.schedule == "step" and cfg.loss.focal == 4.0
    # the paper's backbone lr (x0.1) everywhere but the CPU demo, whose few minutes need the backbones to move
    assert cfg.backbone_lr_mult == (0.5 if Path(path).name.startswith("demo") else 0.1)


def test_bad_config_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="law_groups"):
        load_config(FinetuneConfig, None, ["model.law_groups=7"])
    with pytest.raises(ConfigError, match="model.mask_grounding.mask_ratio"):
        load_config(FinetuneConfig, None, ["model.mask_grounding.mask_ratio=0"])


@pytest.fixture(scope="module")
def pretrain_export(tmp_path_factory):
    """A pretraining export (model.safetensors + config.yaml) of a tiny X-VLM at 32 px."""
    from pretrain.task import build_task as build_pretrain_task

    cfg = tiny_cfg()
    torch.manual_seed(0)
    task = build_pretrain_task(cfg, 200)
    exp = tmp_path_factory.mktemp("pre") / "export"
    exp.mkdir()
    save_file({k: v.contiguous() for k, v in task.state_dict().items()}, str(exp / "model.safetensors"))
    save_config(cfg, exp / "config.yaml")
    return exp, task


def test_init_from_pretraining_export(pretrain_export, capsys):
    exp, pre = pretrain_export
    cfg = from_dict(FinetuneConfig, {**FT, "init_from": str(exp.parent)})
    cfg = adopt_pretrained_architecture(cfg)
    assert "is not used" not in capsys.readouterr().out
    # a run that names its tokenizer: another one given to the fine-tuning is said to be unused, and replaced
    named = exp.parent / "named"
    named.mkdir(exist_ok=True)
    pre_cfg = copy.deepcopy(pre.cfg)
    pre_cfg.model.text.tokenizer = str(named / "tok")
    save_config(pre_cfg, named / "config.yaml")
    other = from_dict(FinetuneConfig, {**FT, "init_from": str(named),
                                       "model": {**FT["model"], "text": {"tokenizer": "/elsewhere"}}})
    assert adopt_pretrained_architecture(other).model.text.tokenizer == str(named / "tok")
    assert "model.text.tokenizer=/elsewhere is not used" in capsys.readouterr().out
    assert cfg.model.text.hidden_size == 64 and cfg.model.vision.name == "vit_tiny_patch16_224"
    assert cfg.model.vision.img_size == 64                          # fine-tuning resolution kept
    task = build_task(cfg)
    counts = load_pretrained(task.model, exp)
    assert counts["text"] == len(pre.text.state_dict())
    for k, v in pre.text.state_dict().items():
        torch.testing.assert_close(task.model.text.state_dict()[k], v)
    vit, pre_vit = task.model.vision.vit, pre.vision
    torch.testing.assert_close(vit.blocks[3].attn.qkv.weight, pre_vit.blocks[3].attn.qkv.weight)
    assert pre_vit.pos_embed.shape[1] == 1 + 4 and vit.pos_embed.shape[1] == 1 + 16   # 2x2 grid -> 4x4
    fresh = build_task(cfg)                                         # init_parts: the ViT only, text left as built
    text_before = {k: v.clone() for k, v in fresh.model.text.state_dict().items()}
    assert load_pretrained(fresh.model, exp, ["vision"]) == {"vision": counts["vision"], "text": 0}
    torch.testing.assert_close(fresh.model.vision.vit.blocks[3].attn.qkv.weight, pre_vit.blocks[3].attn.qkv.weight)
    for k, v in text_before.items():
        torch.testing.assert_close(fresh.model.text.state_dict()[k], v)
    assert not torch.equal(text_before["embeddings.word_embeddings.weight"],
                           pre.text.state_dict()["embeddings.word_embeddings.weight"])
    for bad in ([], ["vision", "vision"], ["fusion"], "vision"):
        with pytest.raises(ConfigError, match="init_parts"):
            from_dict(FinetuneConfig, {**FT, "init_parts": bad})
    # init_shrink: 0.25 x the export + 0.75 x the model's own fresh weights, in the loaded parts only
    torch.manual_seed(5)
    shrunk = build_task(cfg)
    own = {k: v.clone() for k, v in shrunk.model.vision.vit.state_dict().items()}
    text_own = {k: v.clone() for k, v in shrunk.model.text.state_dict().items()}
    load_pretrained(shrunk.model, exp, ["vision"], shrink=0.25)
    w = "blocks.3.attn.qkv.weight"
    torch.testing.assert_close(shrunk.model.vision.vit.state_dict()[w], 0.25 * pre_vit.state_dict()[w] + 0.75 * own[w])
    for k, v in text_own.items():
        torch.testing.assert_close(shrunk.model.text.state_dict()[k], v)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="init_shrink"):
            from_dict(FinetuneConfig, {**FT, "init_shrink": bad})
    save_file({"x": torch.zeros(1)}, str(exp.parent / "bad.safetensors"))
    with pytest.raises(ConfigError, match="no 'vision.'"):
        load_pretrained(task.model, exp.parent / "bad.safetensors")


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_train_evaluate_predict_cli(tmp_path, monkeypatch, capsys):
    from finetune.__main__ import main as train_main
    from finetune.evaluate import main as eval_main
    from finetune.predict import main as predict_main

    data = tmp_path / "refcoco"
    write_shards(data / "train", "refcoco", 2, 3, seed=1, record=grounding_record, split="train")
    write_shards(data / "val", "refcoco", 1, 3, seed=2, record=grounding_record, ref_base=1000)
    build_vocab_tokenizer(WORDS, tmp_path / "tok")
    cfg = {**FT, "init_from": None,
           "model": {**FT["model"], "vision": {"name": "vit_tiny_patch16_224", "img_size": 64},
                     "text": {"hidden_size": 64, "num_layers": 2, "text_layers": 1, "num_heads": 2,
                              "intermediate_size": 128, "max_len": 12, "tokenizer": str(tmp_path / "tok")}},
           "data": {**FT["data"], "shards": str(data), "batches_per_epoch": 2},
           "eval": {"splits": ["val"], "batch_size": 8},
           "optim": {"total_steps": 3, "step_milestones": [2]},
           "engine": {"deepspeed": False, "precision": "fp32"},
           "run": {"out_dir": str(tmp_path / "run"), "log_every": 1, "save_every": 3,
                   "wandb": {"mode": "disabled"}}}
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ)
    try:
        assert train_main(["--config", str(path)]) == 0
    finally:
        os.environ.clear()
        os.environ.update(env)
    run = tmp_path / "run"
    results = json.loads((run / "eval.json").read_text())
    assert results["val"]["n"] > 0 and 0.0 <= results["val"]["rec"]["prec@0.5"] <= 1.0
    assert (run / "export" / "model.safetensors").is_file() and (run / "export" / "config.yaml").is_file()

    out = tmp_path / "val.json"
    assert eval_main(["--checkpoint", str(run / "export"), "--data", str(data), "--split", "val", "--out", str(out),
                      "--device", "cpu", "--workers", "0"]) == 0
    again = json.loads(out.read_text())
    assert again["split"] == "val" and again["n"] == results["val"]["n"]
    assert again["rec"] == results["val"]["rec"] and again["res"] == pytest.approx(results["val"]["res"])

    # two real ranks (gloo): each scores its exact share, records are gathered by index -> the same result
    out2 = tmp_path / "val2.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), "-m", "finetune.evaluate", "--checkpoint", str(run / "export"),
                           "--data", str(data), "--split", "val", "--out", str(out2), "--device", "cpu",
                           "--workers", "0"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    two = json.loads(out2.read_text())
    assert two["n"] == again["n"] and two["rec"] == again["rec"] and two["res"] == pytest.approx(again["res"])

    img = tmp_path / "img.jpg"
    Image.fromarray(np.full((40, 70, 3), 90, np.uint8)).save(img)
    png = tmp_path / "pred.png"
    assert predict_main(["--checkpoint", str(run), "--image", str(img), "--text", "the dog", "--out", str(png),
                         "--device", "cpu"]) == 0
    assert Image.open(png).size == (70, 40)
    assert train_main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "error: " in capsys.readouterr().err
