"""PretrainTask end to end on tiny configs: outputs, gradients, region-less batches, lr groups, FLOPs, overfitting."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pretrain.config import ConfigError
from pretrain.fake_batch import random_batch
from pretrain.task import build_task
from pretrain_tiny import tiny_cfg

KEYS = {"loss", "itc", "itm", "mlm", "bbox", "giou", "itm_acc", "mlm_acc", "region_itc", "region_itm",
        "region_mlm", "region_itm_acc", "region_mlm_acc", "temp"}


def batch(seed=0, regions=True):
    g = torch.Generator().manual_seed(seed)
    return random_batch(4, 32, 12, 200, 3 if regions else 0, 6 if regions else 0, masks_per_text=3, generator=g)


def test_forward_outputs_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    task = build_task(tiny_cfg())
    out = task(batch())
    assert KEYS <= set(out)
    for k, v in out.items():
        assert v.ndim == 0 and torch.isfinite(v), k
    assert out["loss"].requires_grad and not out["itc"].requires_grad
    expected = sum(out[k] for k in ("itc", "itm", "mlm")) + sum(
        out[k] for k in ("region_itc", "region_itm", "region_mlm", "bbox", "giou"))
    assert torch.allclose(out["loss"], expected, rtol=1e-5)
    out["loss"].backward()
    no_grad = [n for n, p in task.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []
    assert task.temp.shape == (1,)
    assert {"vision", "text", "fusion", "itm_head", "bbox_head", "mlm_head"} <= dict(task.named_children()).keys()


def test_weights_and_batches_without_regions():
    torch.manual_seed(0)
    task = build_task(tiny_cfg("loss.weights={itc: 2.0, itm: 0.0, mlm: 1.0, bbox: 1.0, giou: 1.0}",
                               "loss.region_weight=0.5"))
    out = task(batch())
    expected = 2 * out["itc"] + out["mlm"] + 0.5 * (2 * out["region_itc"] + out["region_mlm"] + out["bbox"]
                                                     + out["giou"])
    assert torch.allclose(out["loss"], expected, rtol=1e-5)
    out = task(batch(regions=False))
    assert "bbox" not in out and "region_itc" not in out
    assert torch.allclose(out["loss"], 2 * out["itc"] + out["mlm"], rtol=1e-5)
    with pytest.raises(ConfigError, match="unknown loss 'itx'"):
        build_task(tiny_cfg("loss.weights={itx: 1.0}"))


def test_swin_task_runs():
    cfg = tiny_cfg("model.vision.name=swin_tiny_patch4_window7_224", "model.vision.img_size=32",
                   "model.vision.timm_kwargs={embed_dim: 32, depths: [1, 1], num_heads: [1, 2], window_size: 4}")
    task = build_task(cfg)
    out = task(batch())
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and task.fusion.layer[0].crossattention.self.key.in_features == 64


@pytest.mark.slow
def test_grad_checkpointing_gives_the_same_step():
    torch.manual_seed(0)
    plain = build_task(tiny_cfg("model.vision.drop_path_rate=0.0"))
    ckpt = build_task(tiny_cfg("model.grad_checkpointing=true"))
    ckpt.load_state_dict(plain.state_dict())
    plain.eval(), ckpt.eval()           # no dropout; sampling seeded identically below
    outs = []
    for task in (plain, ckpt):
        torch.manual_seed(5)
        out = task(batch())
        out["loss"].backward()
        outs.append((out["loss"].detach(), task.text.layer[0].attention.self.query.weight.grad))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5)
    assert torch.allclose(outs[0][1], outs[1][1], atol=1e-5)


def test_lr_multipliers_name_real_parameters():
    task = build_task(tiny_cfg("optim.head_lr_mult=3.0"))
    mults = task.lr_multipliers()
    names = [n for n, _ in task.named_parameters()]
    for prefix, mult in mults.items():
        assert mult == 3.0 and any(n.startswith(prefix + ".") for n in names), prefix
    assert not any(n.startswith(tuple(mults)) for n in names if n.startswith(("vision.", "text.")))


@pytest.mark.slow
def test_flops_per_sample_matches_flop_counter():
    """Analytic forward+backward FLOPs within 5% of torch's FlopCounterMode (matmul-only count)."""
    torch.manual_seed(0)
    cfg = tiny_cfg("model.vision.img_size=64", "model.text.max_len=16")
    task = build_task(cfg)
    b = random_batch(4, 64, 16, 200, 3, 6, masks_per_text=6)   # 2 * max_masks = 6 MLM positions scored
    with FlopCounterMode(display=False) as counter:
        task(b)["loss"].backward()
    counted = counter.get_total_flops() / 4
    analytic = task.flops_per_sample(text_len=16)
    assert abs(analytic / counted - 1) < 0.05, (analytic, counted)


@pytest.mark.slow
def test_overfits_eight_fixed_samples():
    """All four losses at both levels on 8 fixed samples: the total falls by >= 90% within 150 CPU steps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # tiny matmuls: one thread is faster, and immune to a busy machine
    try:
        _overfit()
    finally:
        torch.set_num_threads(threads)


def _overfit():
    torch.manual_seed(0)
    task = build_task(tiny_cfg("data.batch_size=8", "data.region_texts=8", "data.region_images=8",
                               "model.text.num_layers=2", "model.text.text_layers=1"))
    b = random_batch(8, 32, 12, 200, 8, 8, masks_per_text=3, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(task.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(150):
        out = task(b)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
        if losses[-1] <= 0.1 * losses[0]:
            break
    assert losses[-1] <= 0.1 * losses[0], (losses[0], losses[-1])
    for k in ("itc", "itm", "mlm", "region_itc", "region_itm", "region_mlm", "bbox", "giou"):
        assert torch.isfinite(out[k]), k


def test_uint8_images_are_normalised_inside_the_step():
    from shards.augment import normalize
    torch.manual_seed(0)
    task = build_task(tiny_cfg("loss.weights={itc: 1.0, itm: 0.0, mlm: 1.0, bbox: 1.0, giou: 1.0}")).eval()
    b = batch()
    g = torch.Generator().manual_seed(0)
    raw = {k: torch.randint(0, 256, b[k].shape, generator=g, dtype=torch.uint8) for k in ("image", "region_image")}
    d = task.cfg.data
    with torch.no_grad():
        a = task({**b, **raw})
        f = task({**b, **{k: normalize(v, d.mean, d.std) for k, v in raw.items()}})
    assert all(torch.allclose(a[k], f[k], atol=1e-5) for k in ("loss", "itc", "mlm", "bbox"))
