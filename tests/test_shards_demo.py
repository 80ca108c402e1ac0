"""The demo's data stage: synthetic raw data -> every shard set, all of them intact."""
from __future__ import annotations

import pytest

from shards.demo import build_demo_shards, build_demo_tokenizer, shard_texts
from shards.inspect import check_dir


@pytest.mark.slow
def test_build_demo_shards(tmp_path, capsys):
    manifests = build_demo_shards(tmp_path, seed=0, images=16, workers=2)
    assert set(manifests) == {"coco", "vg", "cc3m", "objects365", "refcoco/train", "refcoco/val", "refcoco/testA",
                              "refcoco/testB"}
    for name, m in manifests.items():
        assert m["samples"] > 0, name
        assert check_dir(tmp_path / "shards" / name) == [], name
    assert manifests["coco"]["skipped"]["excluded_refer"] > 0 and manifests["vg"]["skipped"]["excluded_refer"] > 0
    assert manifests["coco"]["captions"] > 0 and manifests["coco"]["regions_by_kind"] == {"object": manifests["coco"]["regions"]}
    assert set(manifests["vg"]["regions_by_kind"]) == {"object", "region"}
    assert manifests["refcoco/val"]["refs_by_split"] == {"val": manifests["refcoco/val"]["refs"]}
    out = capsys.readouterr().out
    assert "[shards demo] python -m shards coco" in out and "shard sets under" in out

    tok_dir = build_demo_tokenizer(tmp_path)
    from shards.text import build_tokenizer, clean_caption
    tok = build_tokenizer(tok_dir)
    texts = shard_texts(tmp_path / "shards")
    assert len(texts) == sum(m["captions"] + m["regions"] + m["sentences"] for m in manifests.values())
    ids = tok([clean_caption(t) for t in texts])["input_ids"]  # the loaders tokenise cleaned text
    assert all(tok.unk_token_id not in seq for seq in ids)
