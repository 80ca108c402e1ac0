"""gRefCOCO's metrics on hand-made records, the maximum matching behind Prec@(F1=1, IoU>=0.5), and the
evaluator on generalised shards: identical under one and two ranks, and the dumped predictions score the same."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from finetune.evaluate import evaluate_model, evaluate_predictions, merge_records, score_split, write_jsonl
from finetune.grefcoco_metrics import F1_KEY, generalised_record, matched_pairs, summarize_generalised
from finetune.metrics import summarize
from finetune.task import build_model
from finetune_helpers import tiny_config
from loader_shards import jpeg, sentence, write_shards
from shards.index import GroundingDataset


def _mask(h, w, boxes):
    m = np.zeros((h, w), dtype=bool)
    for x, y, bw, bh in boxes:
        m[y:y + bh, x:x + bw] = True
    return m


def test_maximum_matching_beats_greedy():
    gts = [[0, 0, 10, 10], [2, 0, 10, 10]]
    preds = [[0.8, 0, 10, 10], [-2, 0, 10, 10]]     # P0 fits both (0.85, 0.79), P1 only the first (0.67, 0.43)
    assert matched_pairs(preds, gts) == 2 == matched_pairs(preds[::-1], gts)
    assert matched_pairs(preds[1:], gts) == 1 and matched_pairs([], gts) == 0


def test_grefcoco_metrics_on_a_hand_made_split():
    h, w = 20, 20
    a_gt = [[0, 0, 4, 4], [10, 10, 4, 4]]
    recs = [
        # two targets, both found; the predicted masks cover 12 of the 16 + 16 target pixels
        generalised_record([[0, 0, 4, 4], [10, 10, 4, 5]], a_gt, False, _mask(h, w, [(0, 0, 4, 3), (10, 10, 4, 3)]),
                           _mask(h, w, [(0, 0, 4, 4), (10, 10, 4, 4)])),
        # one target, answered "no target": I = 0, U = 9; its box list is empty
        generalised_record([], [[5, 5, 3, 3]], True, _mask(h, w, [(0, 0, 2, 2)]), _mask(h, w, [(5, 5, 3, 3)])),
        # no target, answered "no target": IoU 1, I = U = 0
        generalised_record([], [], True, np.zeros((h, w), bool), np.zeros((h, w), bool)),
        # no target, answered with a box and a 5-pixel mask: IoU 0, U = 5
        generalised_record([[1, 1, 2, 2]], [], False, _mask(h, w, [(0, 0, 5, 1)]), np.zeros((h, w), bool)),
    ]
    assert [(r["inter"], r["union"]) for r in recs] == [(24, 32), (0, 9), (0, 0), (0, 5)]
    g = summarize_generalised(recs)
    assert g["n"] == 4 and g["no_target"] == 2 and g["multi_target"] == 1
    assert g["giou"] == pytest.approx((24 / 32 + 0 + 1 + 0) / 4)
    assert g["ciou"] == pytest.approx(24 / (32 + 9 + 0 + 5))
    assert g["n_acc"] == 0.5 and g["t_acc"] == 0.5 and g["rec_n_acc"] == 0.5
    assert g[F1_KEY] == 0.5                       # the two-target answer and the correct "no target"
    silent = generalised_record([[1, 1, 2, 2]], [], False, np.zeros((h, w), bool), np.zeros((h, w), bool))
    assert (silent["inter"], silent["union"], silent["mask_iou"]) == (0, 0, 0.0)   # not "no target": IoU 0
    wrong_count = generalised_record([[0, 0, 4, 4], [10, 10, 4, 5], [15, 15, 2, 2]], a_gt, False, None, None)
    assert summarize_generalised([wrong_count])[F1_KEY] == 0.0 and "giou" not in summarize_generalised([wrong_count])
    out = summarize(recs + [{"box_iou": 0.7}])    # beside the usual metrics; REC P@0.5 counts one-target records
    assert out["grefcoco"]["n"] == 4 and out["rec"] == {"prec@0.5": 1.0, "n": 1} and out["n"] == 5


def generalised_record_fn(source, i, rng, *, size=(96, 64)):
    """An image with three boxes: a ref naming two of them, a no-target ref and a one-target ref."""
    from pycocotools import mask as mask_utils

    w, h = size
    boxes = [[4 + 30 * k, int(rng.integers(2, 30)), 20, int(rng.integers(12, 30))] for k in range(3)]

    def rle(b):
        m = np.zeros((h, w), dtype=np.uint8)
        m[b[1]:b[1] + b[3], b[0]:b[0] + b[2]] = 1
        return {"size": [h, w], "counts": mask_utils.encode(np.asfortranarray(m))["counts"].decode("ascii")}

    targets = [[0, 1], [], [2]]
    refs = [{"ref_id": i * 10 + r, "ann_ids": [i * 100 + t for t in ts], "no_target": not ts, "split": "val",
             "bboxes": [boxes[t] for t in ts], "masks": [rle(boxes[t]) for t in ts],
             "sentences": [sentence(rng) for _ in range(1 + r % 2)]} for r, ts in enumerate(targets)]
    rec = {"schema": 1, "source": source, "image_id": str(i), "width": w, "height": h, "orig_width": w,
           "orig_height": h, "refs": refs}
    return rec, jpeg(w, h, rng, boxes)


@pytest.fixture(scope="module")
def gval(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("grefcoco") / "val", "grefcoco", 2, 3, seed=3,
                        record=generalised_record_fn)


@pytest.mark.parametrize("head", ["mdetr", "vglaw"])
def test_generalised_evaluation_exact_under_two_ranks_and_from_its_dump(gval, tok, tmp_path, head):
    torch.manual_seed(0)
    over = {"model.text.max_len": 16, "model.head": head,
            "model.mdetr": {"queries": 4, "dim": 32, "depth": 1, "heads": 4, "align_dim": 8,
                            "score_threshold": 0.45}}
    model = build_model(tiny_config(**over).model, len(tok)).eval()
    ds = GroundingDataset(gval, tok, train=False, image_size=64, max_len=16)
    one = score_split(model, ds, batch_size=4, device="cpu")
    two = merge_records([score_split(model, ds, batch_size=3, device="cpu", rank=r, world_size=2) for r in range(2)])
    assert one == two
    s = summarize(one)
    assert s["grefcoco"]["n"] == len(ds) and s["grefcoco"]["no_target"] > 0 and s["grefcoco"]["multi_target"] > 0
    assert s["rec"]["n"] == sum(1 for i in range(len(ds)) if len(ds.target(i)["bboxes"]) == 1)
    dump = tmp_path / "dump.jsonl"
    direct = evaluate_model(model, gval, tok, batch_size=4, device="cpu", image_size=64, max_len=16, dump=dump)
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert all(len(r["bboxes"]) == len(r["masks"]) == len(r["scores"]) for r in rows)
    if head == "vglaw":
        assert all(len(r["bboxes"]) == 1 for r in rows)          # the one-instance head answers one box
    preds = tmp_path / "preds.jsonl"
    write_jsonl(preds, [{k: r[k] for k in ("ref_id", "sentence", "bbox", "mask", "bboxes", "masks", "no_target")}
                        for r in rows])
    scored = evaluate_predictions(preds, gval)
    assert scored["predictions"]["missing"] == 0
    assert scored["grefcoco"] == pytest.approx(direct["grefcoco"]) and scored["res"] == pytest.approx(direct["res"])
    # ground truth as predictions: perfect on every gRefCOCO metric
    gts = [ds.target(i) for i in range(len(ds))]
    write_jsonl(preds, [{"ref_id": t["ref_id"], "sentence": t["sentence"], "bboxes": t["bboxes"], "masks": t["masks"],
                         "no_target": t["no_target"]} for t in gts])
    perfect = evaluate_predictions(preds, gval)["grefcoco"]
    assert all(perfect[k] == 1.0 for k in ("giou", "ciou", "n_acc", "t_acc", F1_KEY, "rec_n_acc")), perfect


def test_dataset_items_carry_every_target(gval, tok):
    one = GroundingDataset(gval, tok, train=True, image_size=64, max_len=16)
    multi = GroundingDataset(gval, tok, train=True, image_size=64, max_len=16, max_targets=3)
    n_none = sum(len(r["sentences"]) for im in multi.images for r in im["refs"] if r["no_target"])
    assert one.skips["no_target_one_box"] == n_none > 0 and len(multi) == len(one) + n_none
    ev = GroundingDataset(gval, tok, train=False, image_size=64, max_len=16, max_targets=3)
    for i in range(len(ev)):
        t, item = ev.target(i), ev[i]
        k = len(t["bboxes"])
        assert int(item["n_targets"]) == k and (item["boxes"][k:] == 0).all() and item["target_masks"][k:].sum() == 0
        if k:       # evaluation letterbox: every target box and mask where the union box and merged mask say
            lo = (item["boxes"][:k, :2] - item["boxes"][:k, 2:] / 2).amin(0)
            hi = (item["boxes"][:k, :2] + item["boxes"][:k, 2:] / 2).amax(0)
            torch.testing.assert_close(torch.cat([(lo + hi) / 2, hi - lo]), item["bbox"], atol=1e-5, rtol=0)
            assert (item["target_masks"][:k].amax(0) == item["mask"].byte()).all()
        else:
            assert item["mask"].sum() == 0
