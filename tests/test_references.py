"""Language-blind references (finetune.references) on a hand-made refer dataset with known answers."""
from __future__ import annotations

import json
import pickle

import pytest

from finetune.references import language_blind_references


def _square(x, y, s):
    return [[x, y, x + s, y, x + s, y + s, x, y + s]]


@pytest.fixture
def refer_root(tmp_path):
    """One 100x100 image with three squares (sides 10, 20, 40; areas 100, 400, 1600); two refs in val (the
    small and the large square, two sentences for the small one), one in train."""
    d = tmp_path / "refcoco"
    d.mkdir()
    anns = [{"id": i + 1, "image_id": 7, "category_id": 1, "iscrowd": 0, "area": float(s * s),
             "bbox": [x, y, s, s], "segmentation": _square(x, y, s)}
            for i, (x, y, s) in enumerate([(0, 0, 10), (30, 0, 20), (50, 50, 40)])]
    inst = {"images": [{"id": 7, "width": 100, "height": 100, "file_name": "x.jpg"}], "annotations": anns,
            "categories": [{"id": 1, "name": "square"}]}
    (d / "instances.json").write_text(json.dumps(inst))
    refs = [{"ref_id": 1, "ann_id": 1, "image_id": 7, "split": "val", "category_id": 1,
             "sentences": [{"sent": "the small square"}, {"sent": "the leftmost square"}]},
            {"ref_id": 2, "ann_id": 3, "image_id": 7, "split": "val", "category_id": 1,
             "sentences": [{"sent": "the large square"}]},
            {"ref_id": 3, "ann_id": 2, "image_id": 7, "split": "train", "category_id": 1,
             "sentences": [{"sent": "the middle square"}]}]
    (d / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return tmp_path


def test_references_match_hand_computed_values(refer_root):
    r = language_blind_references(refer_root, "val")
    assert r["n"] == 3                                  # three val sentences
    # a random object is the target with probability 1/3 (exact box, exact mask; the others don't overlap)
    assert r["random_object"]["rec"] == pytest.approx(1 / 3)
    assert r["random_object"]["miou"] == pytest.approx(1 / 3)
    # the largest object is the target of one of the three sentences
    assert r["largest_object"]["rec"] == pytest.approx(1 / 3)
    assert r["largest_object"]["miou"] == pytest.approx(1 / 3)
    # the union of all masks: IoU = target area / 2100 (polygons rasterise with their edge pixels included)
    union = r["all_objects"]["miou"]
    assert 2 * (100 / 2100) / 3 + (1600 / 2100) / 3 == pytest.approx(union, abs=0.03)
    # the box around all three is [0, 0, 90, 90]: IoU 1600/8100 with the large square, less with the small one
    assert r["all_objects"]["rec"] == 0.0


def test_references_per_kind(refer_root):
    r = language_blind_references(refer_root, "val", by_kind=lambda t: "superlative" if "most" in t else "attribute")
    assert r["kinds"]["superlative"]["n"] == 1 and r["kinds"]["attribute"]["n"] == 2
    assert r["kinds"]["superlative"]["largest_object"]["rec"] == 0.0
    assert r["kinds"]["attribute"]["largest_object"]["rec"] == pytest.approx(0.5)


def test_distinct_answer_rate_counts_pairs_with_different_targets_only():
    from finetune.references import distinct_answer_rate

    # image 1: refs 10 and 11 name objects 100 and 101, ref 12 names 100 again; image 2: refs 20, 21
    targets = {10: (1, 100), 11: (1, 101), 12: (1, 100), 20: (2, 200), 21: (2, 201)}
    rows = [{"ref_id": 10, "bbox": [0, 0, 10, 10]},
            {"ref_id": 11, "bbox": [50, 50, 10, 10]},       # differs from 10 -> counts
            {"ref_id": 12, "bbox": [1, 1, 10, 10]},         # same target as 10: not a pair; vs 11 differs
            {"ref_id": 20, "bbox": [0, 0, 10, 10]},
            {"ref_id": 21, "bbox": [0, 0, 10, 11]}]         # same answer for a different target
    out = distinct_answer_rate(rows, targets)
    assert out["pairs"] == 3 and out["rate"] == pytest.approx(2 / 3)
    assert distinct_answer_rate([], targets)["pairs"] == 0


def test_references_per_grouping_in_the_same_pass(refer_root):
    """`groupings`: more fields beside "kinds" from one pass; a None group leaves the sentence out of that field."""
    kind = lambda t: "superlative" if "most" in t else "attribute"          # noqa: E731
    r = language_blind_references(refer_root, "val", by_kind=kind,
                                  groupings={"size": lambda t: next((w for w in ("small", "large") if w in t), None)})
    assert r["kinds"] == language_blind_references(refer_root, "val", by_kind=kind)["kinds"]
    assert set(r["size"]) == {"small", "large"} and r["size"]["small"]["n"] == 1 and r["size"]["large"]["n"] == 1
    assert r["size"]["large"]["largest_object"]["rec"] == 1.0 and r["size"]["small"]["largest_object"]["rec"] == 0.0
    assert "size" not in language_blind_references(refer_root, "val")
