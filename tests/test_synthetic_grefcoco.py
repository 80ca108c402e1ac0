"""The synthetic gRefCOCO set: multi-target and no-target expressions that resolve to exactly their targets
(objects rebuilt from the written instances.json), the parser on plural forms, and the converter writing the
generalised ref schema."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from shards.synthetic import generate
from shards.synthetic_scene import SIZE_THRESHOLD
from shards.synthetic_text import Query, multi_target_queries, parse, resolve
from tests.shards_testutil import SeenObject

N_IMAGES = 10


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synthetic_gref") / "raw"
    return out, generate(out, seed=0, images=N_IMAGES)


def test_every_generalised_expression_resolves_to_exactly_its_targets(raw):
    out, summary = raw
    root = out / "refer" / "grefcoco"
    refs = json.loads((root / "grefs(unc).json").read_text())
    inst = json.loads((root / "instances.json").read_text())
    cats = {c["id"]: c["name"] for c in inst["categories"]}
    images = {im["id"]: im for im in inst["images"]}
    kinds = {"multi": 0, "none": 0, "one": 0, "counted": 0, "relation_multi": 0}
    for r in refs:
        im = images[r["image_id"]]
        side = min(im["width"], im["height"])
        anns = [a for a in inst["annotations"] if a["image_id"] == r["image_id"]]
        seen = [SeenObject(cats[a["category_id"]].split()[1], cats[a["category_id"]].split()[0],
                      "large" if max(a["bbox"][2:]) > SIZE_THRESHOLD * side else "small", a["bbox"]) for a in anns]
        index = {a["id"]: i for i, a in enumerate(anns)}
        assert isinstance(r["ann_id"], list) and r["no_target"] == (r["ann_id"] == [-1])
        targets = [] if r["no_target"] else sorted(index[a] for a in r["ann_id"])
        assert r["sentences"]
        for s in r["sentences"]:
            for text in (s["sent"], s["raw"]):
                assert resolve(text, seen, side) == targets, (r["ref_id"], text)
            q = parse(s["sent"])
            if q.quantity not in (None, "all"):
                assert {"two": 2, "three": 3, "four": 4}[q.quantity] == len(targets)
                kinds["counted"] += 1
            if len(targets) > 1:
                assert q.quantity is not None              # a plural expression names the several targets
                kinds["relation_multi"] += q.kind == "relation"
        kinds["multi" if len(targets) > 1 else "none" if not targets else "one"] += 1
    assert all(v > 0 for v in kinds.values()), kinds
    g = summary["grefcoco"]
    assert sum(v["refs"] for v in g.values()) == len(refs)
    assert sum(v["no_target"] for v in g.values()) == kinds["none"]
    assert sum(v["multi_target"] for v in g.values()) == kinds["multi"]
    assert set(g) == {"train", "val", "testA", "testB"}


def test_plural_parser_and_resolver():
    objs = [SeenObject("circle", "red", "small", [10, 10, 30, 30]),
            SeenObject("circle", "red", "small", [20, 120, 30, 30]),
            SeenObject("star", "blue", "large", [120, 60, 60, 60]),
            SeenObject("circle", "green", "small", [200, 10, 30, 30])]
    assert resolve("all the red circles", objs, 240) == [0, 1]
    assert resolve("the two red shapes", objs, 240) == [0, 1]
    assert resolve("all the circles left of the blue star", objs, 240) == [0, 1]
    assert resolve("The three circles.", objs, 240) == [0, 1, 3]
    assert resolve("the green star", objs, 240) == []
    assert parse("the two circles left of the star") == Query(parse("the circle").target, "relation", "left",
                                                             parse("the star").target, "two")
    with pytest.raises(ValueError, match="plural"):
        parse("all the red circle")
    with pytest.raises(ValueError):
        parse("the red circles")                    # a plural noun needs a quantity
    groups = multi_target_queries(objs, 240)
    assert (0, 1) in groups and (0, 1, 3) in groups
    assert all(resolve(" ".join(["all the", q.target.text(True)]), objs, 240) == list(k)
               for k, qs in groups.items() for q in qs if q.kind == "attribute")
