"""The streaming pretraining loader: rank/worker splits, source weights, bad samples, exact resume."""
from collections import Counter

import pytest
import torch

from loader_shards import data_cfg, write_shards
from shards.stream import DataError, PretrainStream, StreamSettings, build_pretrain_loader, parse_sources


def _run(cfg, tok, **kw):
    loader = build_pretrain_loader(cfg, tok, record_keys=True, **kw)
    batches = list(loader)
    return loader, batches


@pytest.mark.parametrize("n_shards,per_shard", [(8, 6), (2, 24)])   # shard split / sample split
def test_two_ranks_two_workers_disjoint_and_cover_the_epoch(tmp_path, tok, n_shards, per_shard):
    write_shards(tmp_path / "coco", "coco", n_shards, per_shard)
    total = n_shards * per_shard                      # 48 samples, 4 consumers x 12 = 3 batches of 4 each
    cfg = data_cfg([{"name": "coco", "shards": str(tmp_path / "coco")}], num_workers=2, batch_size=4,
                   batches_per_epoch=6, shuffle_buffer=1)
    per_consumer = []
    for rank in range(2):
        loader, batches = _run(cfg, tok, rank=rank, world_size=2, epoch=3, seed=0)
        assert len(batches) == 6
        by_worker = {0: [], 1: []}
        for i, keys in enumerate(loader.keys):       # DataLoader alternates workers: batch i from worker i % 2
            by_worker[i % 2] += keys[:4]             # the image-text keys
        per_consumer += [set(by_worker[0]), set(by_worker[1])]
        assert all(len(by_worker[w]) == 12 for w in (0, 1))
    for i in range(4):
        assert len(per_consumer[i]) == 12            # no repeats inside a consumer's share
        for j in range(i + 1, 4):
            assert not per_consumer[i] & per_consumer[j]
    assert set().union(*per_consumer) == {f"coco-{i}" for i in range(total)}


@pytest.mark.slow
def test_source_weights_respected_over_10000_samples(tmp_path, tok):
    weights = {"coco": 1.0, "vg": 1.0, "o365": 0.5}
    sources = [{"name": n, "shards": str(write_shards(tmp_path / n, n, 3, 20, seed=k, regions=False)), "weight": w}
               for k, (n, w) in enumerate(weights.items())]
    settings = StreamSettings.from_config(data_cfg(sources, batch_size=50, region_texts=0, shuffle_buffer=100))
    stream = PretrainStream(parse_sources(sources), tok, settings, rank=1, world_size=2, epoch=0, seed=1,
                            num_workers=2)
    counts, plans = Counter(), stream.plans(1)
    for _ in range(200):                              # plans: the decode-free part of the batch pipeline
        counts.update(it.raw.key.split("-")[0] for it in next(plans).images)
    n = sum(counts.values())
    assert n == 10_000
    for name, w in weights.items():
        assert abs(counts[name] / n - w / sum(weights.values())) < 0.03, counts


def test_batch_contract_shapes_and_values(tmp_path, tok):
    write_shards(tmp_path / "coco", "coco", 2, 8)
    write_shards(tmp_path / "cc3m", "cc3m", 2, 8, regions=False)
    cfg = data_cfg([{"name": "coco", "shards": str(tmp_path / "coco")},
                    {"name": "cc3m", "shards": str(tmp_path / "cc3m"), "weight": 2.0}],
                   batches_per_epoch=3, max_tokens=16)
    loader, batches = _run(cfg, tok, rank=0, world_size=1, epoch=0, seed=0)
    assert len(batches) == 3 == len(loader)
    b = batches[0]
    B, R, M, S, L = 4, 6, 3, 32, 16
    expect = {"image": (B, 3, S, S), "text_ids": (B, L), "text_mask": (B, L), "mlm_ids": (B, L), "mlm_labels": (B, L),
              "region_image": (M, 3, S, S), "region_image_idx": (R,), "region_bbox": (R, 4),
              "region_text_ids": (R, L), "region_text_mask": (R, L), "region_mlm_ids": (R, L),
              "region_mlm_labels": (R, L), "region_repeats": ()}
    assert {k: tuple(v.shape) for k, v in b.items()} == expect
    assert b["image"].dtype == torch.float32 and b["text_ids"].dtype == torch.int64
    assert (b["text_ids"][:, 0] == tok.cls_token_id).all()
    assert int(b["region_image_idx"].max()) < M and (b["region_bbox"] >= 0).all() and (b["region_bbox"] <= 1).all()
    assert ((b["mlm_labels"] != -100) <= (b["text_mask"] == 1)).all()
    # the region part only reads the source that has regions (manifest counts say cc3m has none)
    assert all(k.startswith("coco-") for keys in loader.keys for k in keys[B:])


def test_resume_mid_epoch_gives_the_same_batches(tmp_path, tok):
    write_shards(tmp_path / "coco", "coco", 3, 10)
    cfg = data_cfg([{"name": "coco", "shards": str(tmp_path / "coco")}], num_workers=2, batches_per_epoch=7)
    full_loader, full = _run(cfg, tok, rank=0, world_size=1, epoch=2, seed=5)
    for start in (3, 4):
        loader, rest = _run(cfg, tok, rank=0, world_size=1, epoch=2, seed=5, start_batch=start)
        assert len(rest) == 7 - start
        assert loader.keys == full_loader.keys[start:]
        for a, b in zip(full[start:], rest):
            assert all(torch.equal(a[k], b[k]) for k in a)
    other_loader, _ = _run(cfg, tok, rank=0, world_size=1, epoch=3, seed=5)
    assert other_loader.keys != full_loader.keys          # a new epoch reshuffles


def test_corrupt_jpeg_bad_json_and_truncated_tar_are_skipped_and_counted(tmp_path, tok):
    d = write_shards(tmp_path / "coco", "coco", 3, 8)
    import io
    import tarfile
    # shard 0: one sample's JPEG replaced by garbage, one JSON broken
    src = d / "shard-000000.tar"
    members = []
    with tarfile.open(src) as tf:
        for m in tf.getmembers():
            members.append((m.name, tf.extractfile(m).read()))
    with tarfile.open(src, "w") as tf:
        for name, data in members:
            if name == "coco-1.jpg":
                data = b"\xff\xd8\xff\xe0 definitely not a jpeg" + bytes(300)
            if name == "coco-2.json":
                data = b'{"width": 64, "height": '
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    # shard 1: truncated in the middle
    t = d / "shard-000001.tar"
    raw = t.read_bytes()
    t.write_bytes(raw[: len(raw) // 2 + 100])
    cfg = data_cfg([{"name": "coco", "shards": str(d)}], batches_per_epoch=12, shuffle_buffer=4)
    loader, batches = _run(cfg, tok, rank=0, world_size=1, epoch=0, seed=0)
    assert len(batches) == 12                               # the epoch completes
    assert all(torch.isfinite(b["image"]).all() for b in batches)
    assert loader.skips["bad_image"] >= 1 and loader.skips["bad_json"] >= 1, loader.skips
    # the cut shard: a read error and/or fewer samples than its manifest lists
    assert loader.skips["bad_tar"] + loader.skips["truncated_shard"] >= 1, loader.skips
    seen = {k for keys in loader.keys for k in keys}
    assert "coco-2" not in seen                              # bad JSON never reaches a batch


def test_bad_paths_and_settings_are_one_line_errors(tmp_path, tok):
    with pytest.raises(DataError, match="no manifest.json and no .tar shards"):
        build_pretrain_loader(data_cfg([{"name": "x", "shards": str(tmp_path)}]), tok, rank=0, world_size=1,
                              epoch=0, seed=0)
    with pytest.raises(DataError, match="shard not found"):
        build_pretrain_loader(data_cfg([{"name": "x", "shards": str(tmp_path / "s-{0..3}.tar")}]), tok, rank=0,
                              world_size=1, epoch=0, seed=0)
    write_shards(tmp_path / "ok", "ok", 1, 2)
    with pytest.raises(DataError, match="weight"):
        parse_sources([{"name": "x", "shards": str(tmp_path / "ok"), "weight": 0}])
    with pytest.raises(DataError, match="decoder"):
        StreamSettings.from_config(data_cfg([], decoder="magic"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="malformed manifest"):
        parse_sources([{"name": "x", "shards": str(tmp_path / "bad")}])


def test_reads_a_pretrain_data_config_object(tmp_path, tok):
    from pretrain.config import PretrainDataConfig

    write_shards(tmp_path / "coco", "coco", 1, 6)
    cfg = PretrainDataConfig(sources=[{"name": "coco", "shards": str(tmp_path / "coco"), "weight": 1.0}],
                             batch_size=2, region_texts=3, region_images=2, image_size=32, max_words=10,
                             num_workers=0, shuffle_buffer=4, batches_per_epoch=2, mean=[0.5, 0.5, 0.5],
                             std=[0.5, 0.5, 0.5])
    s = StreamSettings.from_config(cfg)
    assert s.text_len == 12 and s.mean == (0.5, 0.5, 0.5) and s.decode_reduce and not s.normalize_in_loader
    batches = list(build_pretrain_loader(cfg, tok, rank=0, world_size=1, epoch=0, seed=0))
    assert len(batches) == 2 and batches[0]["text_ids"].shape == (2, 12)
    assert batches[0]["image"].dtype == torch.uint8          # the pretraining default: the step normalises
    cfg.normalize_in_loader = True
    batches = list(build_pretrain_loader(cfg, tok, rank=0, world_size=1, epoch=0, seed=0))
    assert batches[0]["image"].dtype == torch.float32
    assert batches[0]["image"].min() >= -1.0 - 1e-6 and batches[0]["image"].max() <= 1.0 + 1e-6


def test_uint8_batches_normalise_to_the_loader_normalised_ones(tmp_path, tok):
    from shards.augment import normalize
    write_shards(tmp_path / "coco", "coco", 2, 8)
    kw = dict(batches_per_epoch=2, max_tokens=16)
    src = [{"name": "coco", "shards": str(tmp_path / "coco")}]
    _, floats = _run(data_cfg(src, **kw), tok, rank=0, world_size=1, epoch=0, seed=3)
    _, raw = _run(data_cfg(src, normalize_in_loader=False, **kw), tok, rank=0, world_size=1, epoch=0, seed=3)
    s = StreamSettings.from_config(data_cfg(src, **kw))
    for f, r in zip(floats, raw):
        for k in ("image", "region_image"):
            assert r[k].dtype == torch.uint8 and r[k].shape == f[k].shape
            assert torch.allclose(normalize(r[k], s.mean, s.std), f[k], atol=1e-5)
        assert all(torch.equal(f[k], r[k]) for k in f if k not in ("image", "region_image"))


@pytest.mark.parametrize("bad", [[0.0, 1.0], [0.9, 0.5], [0.2, 1.5], ["a", 1.0], [0.5], 5, [True, 1.0]])
def test_crop_scale_must_be_an_area_range(bad):
    from types import SimpleNamespace

    from shards.stream import DataError, StreamSettings
    with pytest.raises(DataError, match="data.crop_scale"):
        StreamSettings.from_config(SimpleNamespace(crop_scale=bad))
    assert StreamSettings.from_config(SimpleNamespace(crop_scale=[0.8, 1.0])).crop_scale == (0.8, 1.0)
