"""Evaluation on grounding shards: exact under 1 and 2 ranks, predictions files, CLI errors, and a tiny VG-LAW
that overfits 8 expressions."""
from __future__ import annotations

import json

import pytest
import torch

from finetune.evaluate import (evaluate_model, evaluate_predictions, main, merge_records, score_split,
                               write_jsonl)
from finetune.metrics import summarize
from finetune.task import build_model, build_task
from finetune_helpers import tiny_config
from loader_shards import grounding_record, write_shards
from shards.index import GroundingDataset, build_grounding_loader


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("refcoco") / "val"
    return write_shards(d, "refcoco", 2, 3, seed=5, record=grounding_record)


def _flat(result: dict) -> dict:
    return {f"{k}.{m}": v for k in ("rec", "res") for m, v in result.get(k, {}).items()}


def _model(tok):
    torch.manual_seed(0)
    return build_model(tiny_config(**{"model.text.max_len": 16}).model, len(tok)).eval()


def test_evaluation_identical_with_one_and_two_ranks(val_dir, tok):
    model = _model(tok)
    ds = GroundingDataset(val_dir, tok, train=False, image_size=64, max_len=16)
    one = score_split(model, ds, batch_size=4, device="cpu")
    parts = [score_split(model, ds, batch_size=3, device="cpu", rank=r, world_size=2) for r in range(2)]
    assert sorted(len(p) for p in parts) == [len(ds) // 2, len(ds) - len(ds) // 2]
    two = merge_records(parts)
    assert [r["index"] for r in one] == list(range(len(ds))) == [r["index"] for r in two]
    for a, b in zip(one, two):
        assert a["ref_id"] == b["ref_id"] and a["sentence"] == b["sentence"]
        assert a["box_iou"] == pytest.approx(b["box_iou"], abs=1e-6)
        assert (a["inter"], a["union"]) == (b["inter"], b["union"])
    assert summarize(one)["n"] == summarize(two)["n"]
    assert _flat(summarize(one)) == pytest.approx(_flat(summarize(two)))


def test_predictions_file_scores_like_the_model(val_dir, tok, tmp_path):
    model = _model(tok)
    dump = tmp_path / "dump.jsonl"
    direct = evaluate_model(model, val_dir, tok, batch_size=4, device="cpu", image_size=64, max_len=16, dump=dump)
    assert direct["split"] == "val" and set(direct["res"]) == {"miou", "oiou", "prec@0.5", "prec@0.6", "prec@0.7",
                                                               "prec@0.8", "prec@0.9"}
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    preds = tmp_path / "preds.jsonl"
    write_jsonl(preds, [{"ref_id": r["ref_id"], "sentence": r["sentence"], "bbox": r["bbox"], "mask": r["mask"]}
                        for r in rows])
    scored = evaluate_predictions(preds, val_dir)
    assert scored["n"] == direct["n"] and scored["predictions"]["missing"] == 0
    assert _flat(scored) == pytest.approx(_flat(direct))


def test_ground_truth_as_predictions_is_perfect_and_gaps_are_counted(val_dir, tmp_path):
    ds = GroundingDataset(val_dir, None, train=False)
    gts = [ds.target(i) for i in range(len(ds))]
    lines = [json.dumps({"ref_id": t["ref_id"], "sentence": t["sentence"], "bbox": t["bbox"], "mask": t["mask"]})
             for t in gts[1:]]
    preds = tmp_path / "preds.jsonl"
    preds.write_text("\n".join(lines + ["{not json", lines[0]]) + "\n")
    out = evaluate_predictions(preds, val_dir)
    n = len(gts)
    assert out["n"] == n
    assert out["predictions"] == {"missing": 1, "unmatched": 0, "malformed": 1, "duplicate": 1}
    assert out["rec"]["prec@0.5"] == pytest.approx((n - 1) / n)
    assert out["res"]["miou"] == pytest.approx((n - 1) / n)


def test_cli_user_mistakes_exit_2(val_dir, tmp_path, capsys):
    assert main(["--predictions", str(tmp_path / "nope.jsonl"), "--data", str(val_dir.parent), "--split", "val"]) == 2
    assert main(["--predictions", str(tmp_path / "nope.jsonl"), "--data", str(tmp_path), "--split", "val"]) == 2
    assert main(["--checkpoint", str(tmp_path), "--data", str(val_dir.parent), "--split", "val"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)


def test_cli_scores_a_predictions_file(val_dir, tmp_path, capsys):
    ds = GroundingDataset(val_dir, None, train=False)
    preds = tmp_path / "preds.jsonl"
    write_jsonl(preds, [{"ref_id": t["ref_id"], "sentence": t["sentence"], "bbox": t["bbox"], "mask": t["mask"]}
                        for t in (ds.target(i) for i in range(len(ds)))])
    out = tmp_path / "res.json"
    assert main(["--predictions", str(preds), "--data", str(val_dir.parent), "--split", "val", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n"] == len(ds) and res["rec"]["prec@0.5"] == 1.0 and res["res"]["oiou"] == 1.0
    assert "REC P@0.5" in capsys.readouterr().out


@pytest.mark.slow
def test_tiny_model_overfits_eight_expressions(tmp_path, tok):
    d = write_shards(tmp_path / "val", "refcoco", 1, 4, seed=7, record=grounding_record, n_refs=2, sentences=(1, 1))
    ds = GroundingDataset(d, tok, train=False, image_size=64, max_len=16)
    assert len(ds) == 8
    batch = next(iter(build_grounding_loader(ds, train=False, batch_size=8, num_workers=0, rank=0, world_size=1,
                                             epoch=0, seed=0)))
    torch.manual_seed(0)
    task = build_task(tiny_config(**{"model.mask_grounding.enabled": False, "model.text.max_len": 16}), tok)
    opt = torch.optim.AdamW(task.parameters(), lr=3e-3, weight_decay=0.0)
    result = None
    for step in range(300):                 # ~75 steps on this seed; a few hundred at most
        out = task(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        if step % 25 == 24 and out["giou"].item() < 0.4:
            result = evaluate_model(task, d, tok, batch_size=8, device="cpu", image_size=64, max_len=16)
            if result["rec"]["prec@0.5"] == 1.0:
                break
    assert result is not None and result["n"] == 8
    assert result["rec"]["prec@0.5"] == 1.0, (step, result)
    assert result["res"]["miou"] > 0.5
