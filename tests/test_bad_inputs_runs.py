"""The bad-input corpus, part 2: configs, checkpoints, resume, predict and evaluate (see tests/badcorpus.py);
its last test asserts the tally of both parts."""
from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest
import torch

from badcorpus import (CASES, ROOT, TALLY, case, lying_jpeg, one_line_error, run_case, shards_with_bad_image, summary)
from loader_shards import grounding_record, write_shards
from shards_testutil import write_jpeg


# ---------------------------------------------------------------------------------------------- the loop's skip counts
@case(1)
def loader_skips_reach_metrics_and_the_summary(tmp, capsys):
    import yaml

    from test_engine_cli import tiny_pretrain_config

    d = shards_with_bad_image(tmp, lying_jpeg())
    path = tiny_pretrain_config(tmp)
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["sources"] = [{"name": "coco", "shards": str(d)}]
    cfg["data"].update(num_workers=0, batches_per_epoch=2, region_texts=0)
    cfg["optim"]["total_steps"] = 2
    cfg["engine"] = {"deepspeed": False, "precision": "fp32"}
    cfg["run"].update(export=False, out_dir=str(tmp / "run"))
    path.write_text(yaml.safe_dump(cfg))
    from pretrain.__main__ import main
    assert main(["--config", str(path)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["skipped"].get("bad_image", 0) >= 1, summary
    assert rows[-1].get("skipped/bad_image", 0) == summary["skipped"]["bad_image"], rows[-1]
    return "skip"


# ---------------------------------------------------------------------------------------------- configs
def pretrain_cli(capsys, *argv: str) -> tuple[int, list[str]]:
    from pretrain.__main__ import main
    rc = main(list(argv))
    return rc, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


@case(10)
def pretrain_config_mistakes(tmp, capsys):
    shards = write_shards(tmp / "coco", "coco", 1, 2)
    smoke = str(ROOT / "configs" / "pretrain" / "smoke.yaml")
    src = f"data.sources=[{{name: coco, shards: {shards}}}]"
    bad_utf8 = tmp / "latin1.yaml"
    bad_utf8.write_bytes("run: {out_dir: caf\xe9}\n".encode("latin1"))
    blocker = tmp / "a_file"
    blocker.write_text("x")
    for argv, needle in (
            (["--config", str(bad_utf8)], "latin1.yaml: not UTF-8"),
            (["--config", smoke, src, "data.batch_size=0"], "data.batch_size: must be >= 1, got 0"),
            (["--config", smoke, src, "data.num_workers=-1"], "data.num_workers: must be >= 0, got -1"),
            (["--config", smoke, src, "optim.lr=.nan"], "optim.lr: expected a finite number"),
            (["--config", smoke, f"data.sources=[{{name: coco, shards: {shards}, wieght: 5}}]"],
             "data.sources[0]: unknown key 'wieght'"),
            (["--config", smoke, f"data.sources=[{{name: coco, shards: {shards}, weight: .inf}}]"], "weight must be"),
            (["--config", smoke, src, f"run.out_dir={blocker}/run"], "a_file/run: cannot create"),
            (["--config", smoke, src, "run.seed=-1"], "run.seed: must be >= 0"),
            (["--config", smoke, src, "optim.weight_decay=-0.1"], "optim.weight_decay: must be >= 0"),
            (["--config", smoke, src, "optim.step_milestones=[-5]"], "optim.step_milestones")):
        one_line_error(*pretrain_cli(capsys, *argv), needle)
    return "error"


# ---------------------------------------------------------------------------------------------- checkpoints
def evil_pickle(path: Path, marker: Path) -> Path:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"module": Evil()}, path)
    return path


@case(5)
def crafted_pickles_never_run(tmp, capsys):
    from pretrain.checkpoint import CheckpointError, load_consolidated

    marker = tmp / "pwned"
    plain = tmp / "plain" / "checkpoints" / "step_00000001"
    evil_pickle(plain / "mp_rank_00_model_states.pt", marker)
    (plain.parent / "latest").write_text("step_00000001")
    (plain / "complete").write_text("x")
    zero = tmp / "zero" / "step_00000001"                    # a DeepSpeed ZeRO dir: the optimizer states are evil
    zero.mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(2)}, "buffer_names": [], "param_shapes": [{"w": torch.Size([2])}],
                "shared_params": {}, "ds_version": "0.19.8", "frozen_param_shapes": None,
                "frozen_param_fragments": None}, zero / "mp_rank_00_model_states.pt")
    evil_pickle(zero / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    for target in (plain.parent, plain, tmp / "plain", zero):
        with pytest.raises(CheckpointError) as e:
            load_consolidated(target)
        assert "\n" not in str(e.value) and (".pt" in str(e.value) or "step_00000001" in str(e.value)), str(e.value)
    (tmp / "plain" / "config.yaml").write_text("{}\n")           # predict --checkpoint DIR: one line, exit 2
    from finetune.predict import main as predict_main
    img = write_jpeg(tmp / "x.jpg", 32, 32)
    rc = predict_main(["--checkpoint", str(plain), "--image", str(img), "--text", "the dog", "--out",
                       str(tmp / "o.png"), "--device", "cpu"])
    one_line_error(rc, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()], "refused")
    assert not marker.exists()
    return "error"


@case(3)
def truncated_and_corrupt_safetensors_exports(tmp, capsys):
    from safetensors.torch import save_file

    from pretrain.checkpoint import CheckpointError, load_consolidated

    exp = tmp / "export"
    exp.mkdir()
    save_file({"w": torch.randn(64, 64)}, str(exp / "model.safetensors"))
    data = (exp / "model.safetensors").read_bytes()
    for bad in (data[: len(data) // 2], b"\x00" * 16, b"garbage"):
        (exp / "model.safetensors").write_bytes(bad)
        with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
            load_consolidated(exp)
    return "error"


def plain_checkpoints(tmp: Path, steps=(1, 2, 3)):
    from pretrain import checkpoint as ckpt
    from pretrain.plain_engine import PlainEngine

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    eng = PlainEngine(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), grad_accum=1, grad_clip=0,
                      precision="fp32", device=torch.device("cpu"))
    d = tmp / "checkpoints"
    for s in steps:
        ckpt.save_checkpoint(eng, d, s, {"step": s, "samples_seen": s, "epoch": 0, "batch_in_epoch": s}, keep=10)
    return ckpt, eng, d


@case(6)
def dangling_empty_partial_or_unreadable_latest_falls_back(tmp, capsys):
    ckpt, eng, d = plain_checkpoints(tmp)
    (d / "step_00000004").mkdir()                               # a save killed half-way
    for content in (b"", b"step_00000009", b"step_00000004", b"\xff\xfe", b"../../etc"):
        (d / "latest").write_bytes(content)
        warnings: list[str] = []
        assert ckpt.resolve_resume("latest", d) is not None
        cands = ckpt.resume_candidates("latest", d, warn=warnings.append)
        assert cands[0] == (d, "step_00000003") and len(warnings) == 1 and str(d / "latest") in warnings[0], content
    (d / "step_00000003" / "mp_rank_00_model_states.pt").write_bytes(b"not a zip")   # unreadable newest
    from pretrain.config import RunConfig
    from pretrain.engine import _resume

    class Cfg:
        run = RunConfig(resume="latest")
    (tmp / "x").mkdir()
    where, state = _resume(Cfg, eng, d)
    assert where == (d, "step_00000002") and state["step"] == 2
    assert "trying an older checkpoint" in capsys.readouterr().err
    return "warned"


@case(1)
def no_complete_checkpoint_behind_a_bad_pointer(tmp, capsys):
    from pretrain import checkpoint as ckpt

    d = tmp / "checkpoints"
    (d / "step_00000002").mkdir(parents=True)
    (d / "latest").write_text("step_00000002")
    with pytest.raises(ckpt.CheckpointError, match="partial.*no complete checkpoint to fall back to"):
        ckpt.resume_candidates("latest", d)
    return "error"


@case(1)
def pruning_keeps_the_checkpoint_a_run_resumed_from(tmp, capsys):
    ckpt, eng, d = plain_checkpoints(tmp, steps=(1, 2))
    (d / "latest").write_text("step_00000001")
    for s in (3, 4, 5):
        ckpt.save_checkpoint(eng, d, s, {"step": s, "samples_seen": s, "epoch": 0, "batch_in_epoch": s}, keep=2,
                             protect=("step_00000001",))
    assert ckpt.list_tags(d) == ["step_00000001", "step_00000004", "step_00000005"]
    return "correct"


@case(2)
def deleted_rng_file_is_a_loud_warning(tmp, capsys):
    ckpt, eng, d = plain_checkpoints(tmp)
    (d / "step_00000003" / "rng_rank0.pt").unlink()
    state = ckpt.load_checkpoint(eng, d, "step_00000003")
    err = capsys.readouterr().err
    assert state["rng_restored"] is False and "rng_rank0.pt: missing" in err and "not" in err
    (d / "step_00000002" / "rng_rank0.pt").write_bytes(b"\x00garbage")
    with pytest.raises(ckpt.CheckpointError, match="rng_rank0.pt: not a readable checkpoint"):
        ckpt.load_checkpoint(eng, d, "step_00000002")
    return "warned"


@case(1)
def fresh_run_over_an_earlier_runs_checkpoints(tmp, capsys):
    from pretrain.config import RunConfig
    from pretrain.engine import _resume

    ckpt, eng, d = plain_checkpoints(tmp)

    class Cfg:
        run = RunConfig(resume=None)
    with pytest.raises(ckpt.CheckpointError, match="earlier run's checkpoints"):
        _resume(Cfg, eng, d)
    return "error"


# ---------------------------------------------------------------------------------------------- predict, evaluate
@case(4)
def predictions_with_nan_boxes_or_float_ids_are_counted(tmp, capsys):
    from finetune.evaluate import evaluate_predictions

    d = write_shards(tmp / "val", "refcoco", 1, 2, record=grounding_record)
    gt = []
    for p in sorted(d.glob("*.tar")):
        with tarfile.open(p) as tf:
            gt += [json.loads(tf.extractfile(m).read()) for m in tf if m.name.endswith(".json")]
    r0 = gt[0]["refs"][0]
    lines = [{"ref_id": r0["ref_id"], "sentence": 0, "bbox": r0["bbox"]},
             {"ref_id": gt[0]["refs"][1]["ref_id"], "sentence": 0, "bbox": [float("nan"), 0, 5, 5]},
             {"ref_id": float(gt[1]["refs"][0]["ref_id"]) + 0.5, "sentence": 0, "bbox": [0, 0, 5, 5]},
             {"ref_id": gt[1]["refs"][1]["ref_id"], "sentence": 0, "bbox": [0, 0, float("inf"), 5]}]
    preds = tmp / "p.jsonl"
    preds.write_text("\n".join(json.dumps(x) for x in lines) + "\n\xff\n")
    res = evaluate_predictions(preds, d)
    assert res["predictions"]["malformed"] == 4, res["predictions"]
    return "skip"


@case(3)
def predict_whitespace_text_and_unwritable_output(tmp, capsys):
    from finetune.predict import main as predict_main

    img = write_jpeg(tmp / "x.jpg", 32, 32)
    rc = predict_main(["--checkpoint", str(tmp), "--image", str(img), "--text", " \t ", "--out", str(tmp / "o.png")])
    one_line_error(rc, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()], "--text: empty expression")
    (tmp / "f").write_text("x")
    rc = predict_main(["--checkpoint", str(tmp), "--image", str(img), "--text", "a dog", "--out", str(tmp / "f" / "o.png")])
    one_line_error(rc, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()], "f: folder of --out is a file")
    rc = predict_main(["--checkpoint", str(tmp), "--image", str(tmp / "x.jpg"), "--text", "a dog",
                       "--out", str(tmp / "o.png")])              # no checkpoint there: one line too
    one_line_error(rc, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()], str(tmp))
    return "error"


@pytest.mark.parametrize("name, fn", CASES[__name__], ids=[n for n, _ in CASES[__name__]])
def test_bad_input(name, fn, tmp_path, capsys, request):
    run_case(name, fn, tmp_path, capsys, request)


def test_zz_tally():
    if not TALLY:
        pytest.skip("the corpus did not run in this session")
    print(summary())
    assert TALLY["traceback"] == 0 and TALLY["wrong"] == 0, summary()
