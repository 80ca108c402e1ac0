"""The measured options of the VG-LAW task (issue #16): AttBalance's MRC, DAT and RAC's Spearman layer weights,
MagNet's CAL and CAM. Each formula against a hand-computed case or an independent loop implementation, the
option through the real loop (pretrain.engine.train via tests/grounding_options_run.py), and MRC's EMA through
a checkpoint: a run stopped after step 2 and resumed repeats the uninterrupted run, EMA buffers included."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from finetune.attbalance import rac_multi, rac_per_sample, rho_weights, spearman
from finetune.cal import cal_terms
from finetune.config import FinetuneConfig
from finetune.dat import dat_weights
from finetune.momentum import MomentumModel, kl_per_sample, mrc_per_sample
from finetune.task import build_model, build_task
from finetune_helpers import tiny_batch, tiny_config
from pretrain.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "tests" / "grounding_options_run.py"


# ------------------------------------------------------------------------------------------ RAC / Spearman
def test_spearman_with_ties_by_hand():
    # ranks of x = [1, 2.5, 2.5, 4]; deviations (-1.5, 0, 0, 1.5) . (-1.5, -.5, .5, 1.5) = 4.5; norms 4.5 and 5
    rho = spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert abs(rho.item() - 4.5 / math.sqrt(4.5 * 5)) < 1e-6
    assert spearman(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([30.0, 10.0, 20.0])).item() == pytest.approx(1.0)
    assert spearman(torch.ones(4), torch.arange(4.0)).item() == 0.0      # constant: no correlation


def test_rho_weights_by_hand():
    iou = torch.tensor([0.1, 0.2, 0.3, 0.4])
    inside = torch.stack([iou * 2, -iou, torch.tensor([0.4, 0.1, 0.3, 0.2])])   # rho = 1, -1, 0
    # rho of the third: ranks (4, 1, 3, 2) vs (1, 2, 3, 4): sum d^2 = 9 + 1 + 0 + 4 = 14 -> 1 - 6*14/60 = -0.4
    w = rho_weights(inside, iou)
    mean = (1 - 1 - 0.4) / 3
    assert torch.allclose(w, torch.tensor([1 - mean + 1, -1 - mean + 1, -0.4 - mean + 1]), atol=1e-6)


def test_rac_multi_weights_each_map_by_its_rho():
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[0.375, 0.375, 0.25, 0.25]] * 4)
    maps = [torch.rand(4, 16, generator=g).softmax(-1) for _ in range(2)]
    iou = torch.rand(4, generator=g)
    per, w = rac_multi(maps, boxes, (4, 4), iou)
    singles = [rac_per_sample(a, boxes, (4, 4)) for a in maps]
    expected_w = rho_weights(torch.stack([s[1] for s in singles]), iou)
    assert torch.allclose(w, expected_w)
    assert torch.allclose(per, expected_w[0] * singles[0][0] + expected_w[1] * singles[1][0])
    one, w1 = rac_multi(maps[:1], boxes, (4, 4), iou)             # one map: rho' = 1
    assert w1.tolist() == [1.0] and torch.allclose(one, singles[0][0])


# ------------------------------------------------------------------------------------------ MRC
def test_kl_by_hand():
    p = torch.tensor([[0.5, 0.5]])
    q = torch.tensor([[0.25, 0.75]])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_per_sample(p, q).item() == pytest.approx(expected, abs=1e-6)
    assert mrc_per_sample([p, q], [q, q]).item() == pytest.approx(expected, abs=1e-6)    # summed over maps
    assert kl_per_sample(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]])).item() == pytest.approx(math.log(2), abs=1e-6)


def test_ema_update_by_hand():
    lin = nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0]]))
        lin.bias.fill_(4.0)
    mom = MomentumModel(lin, momentum=0.9)
    mom.update(lin)                                   # first update copies
    assert mom.ema("weight").tolist() == [[1.0, 2.0]] and mom.initialised.item() == 1.0
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 0.0]]))
        lin.bias.fill_(-6.0)
    mom.update(lin)
    assert torch.allclose(mom.ema("weight"), torch.tensor([[0.9 * 1 + 0.1 * 3, 0.9 * 2]]))
    assert torch.allclose(mom.ema("bias"), torch.tensor([0.9 * 4 - 0.1 * 6]))
    assert not list(mom.parameters()) and {"weight", "bias", "initialised"} <= set(mom.state_dict())


def test_momentum_model_is_the_model_with_the_ema_weights():
    torch.manual_seed(0)
    task = build_task(tiny_config(**{"loss.mrc": 1.0, "model.attn_layers": [1]}))
    b = tiny_batch()
    task.momentum.update(task.model)
    task.model.eval()
    maps = task.model(b["image"], b["text_ids"], b["text_mask"])["attn_maps"]
    teacher = task.momentum.attention_maps(task.model, b["image"], b["text_ids"], b["text_mask"])
    assert len(teacher) == 2 and all(torch.allclose(t, m, atol=1e-6) for t, m in zip(teacher, maps))
    with torch.no_grad():                              # the EMA, not the live weights, drives the teacher
        for p in task.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    moved = task.model(b["image"], b["text_ids"], b["text_mask"])["attn_maps"]
    again = task.momentum.attention_maps(task.model, b["image"], b["text_ids"], b["text_mask"])
    assert all(torch.allclose(t, a) for t, a in zip(teacher, again))
    assert not torch.allclose(moved[0], again[0])
    assert all(p.requires_grad for p in task.parameters())          # the optimizer sees no EMA tensor


def test_export_needs_no_ema():
    cfg = tiny_config(**{"loss.mrc": 1.0})
    task = build_task(cfg)
    sd = task.state_dict()
    assert any(k.startswith("momentum.") for k in sd)
    model_sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}   # load_finetuned's view
    build_model(cfg.model).load_state_dict(model_sd, strict=True)


# ------------------------------------------------------------------------------------------ DAT
def test_dat_weights_by_hand():
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])   # box ratios 0.25 and 1
    w = dat_weights(torch.tensor([0.0, 2.0]), boxes)
    w_odw = [0.5 + 1 / (1 + math.exp(0.25 - 1)), 0.5 + 0.5]
    w_adw = [0.5 + 0.5, 0.5 + 1 / (1 + math.exp(-2.0))]
    assert torch.allclose(w, torch.tensor([w_odw[0] * w_adw[0], w_odw[1] * w_adw[1]]), atol=1e-6)
    assert torch.allclose(dat_weights(None, boxes), torch.tensor(w_odw), atol=1e-6)


def test_task_dat_reweights_the_box_losses_per_sample():
    from finetune.losses import box_losses_per_sample

    torch.manual_seed(0)
    task = build_task(tiny_config(**{"loss.dat": True, "loss.rac": 1.0, "loss.l1": 2.0})).eval()
    b = tiny_batch()
    out = task(b)
    pred = task.model(b["image"], b["text_ids"], b["text_mask"])
    l1, giou = box_losses_per_sample(pred["boxes"], b["bbox"])
    rac, _ = rac_per_sample(pred["lap_attn"], b["bbox"], pred["grid"])
    w = dat_weights(rac, b["bbox"])
    assert out["dat_box"].item() == pytest.approx((w * (2.0 * l1 + giou)).mean().item(), rel=1e-5)
    total = out["dat_box"] + 4 * out["focal"] + 4 * out["dice"] + out["rac"]
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------ CAL
def reference_cal(f, pos, t, t1, t2):
    """MagNet's L_P2P and L_P2T written out with loops over pixels (one sample, all pixels)."""
    f = torch.nn.functional.normalize(f, dim=-1)
    t = torch.nn.functional.normalize(t, dim=-1)
    P = [f[i] for i in range(len(f)) if pos[i]]
    N = [f[i] for i in range(len(f)) if not pos[i]]
    ap = torch.nn.functional.normalize(sum(P) / len(P), dim=0)
    an = torch.nn.functional.normalize(sum(N) / len(N), dim=0)

    def term(x, anchor, others, tau):
        a = math.exp(float(x @ anchor) / tau)
        return -math.log(a / (a + sum(math.exp(float(x @ o) / tau) for o in others)))

    p2p = sum(term(x, ap, N, t1) for x in P) / len(P) + sum(term(x, an, P, t1) for x in N) / len(N)
    p2t = sum(term(x, t, N, t2) for x in P) / len(P)
    return p2p, p2t


def test_cal_matches_a_loop_implementation():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 7, 5, generator=g)
    pos = torch.tensor([[1, 1, 0, 0, 0, 1, 0], [0, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    t = torch.randn(2, 5, generator=g)
    p2p, p2t, valid = cal_terms(f, pos, t, 0.1, 0.2, max_pixels=0)
    assert valid.tolist() == [True, True]
    for i in range(2):
        rp, rt = reference_cal(f[i], pos[i], t[i], 0.1, 0.2)
        assert p2p[i].item() == pytest.approx(rp, rel=1e-4) and p2t[i].item() == pytest.approx(rt, rel=1e-4)
    # drawing at most 2 pixels per class: only drawn pixels of the right class enter
    torch.manual_seed(0)
    p2p, _, _ = cal_terms(f, pos, t, 0.1, 0.2, max_pixels=2)
    assert torch.isfinite(p2p).all()
    _, _, valid = cal_terms(f, torch.zeros(2, 7, dtype=torch.bool), t, 0.1, 0.2)   # no object pixels
    assert valid.tolist() == [False, False]


def test_cal_draw_is_trimmed_to_the_largest_class_without_changing_the_loss():
    from finetune.cal import _draw

    member = torch.zeros(3, 40, dtype=torch.bool)
    member[0, [1, 5, 9]] = True
    member[1, 10:16] = True                                   # the most members: 6
    idx, valid = _draw(member, 32)
    assert idx.shape == (3, 6)                                # not 32: the other columns could only be masked out
    for r in range(3):                                        # every member drawn, each once
        assert sorted(idx[r][valid[r]].tolist()) == member[r].nonzero().flatten().tolist()
    # the loss with a cap above every class's size equals the loss over all pixels (the draw only reorders them)
    g = torch.Generator().manual_seed(1)
    f, t = torch.randn(2, 30, 8, generator=g), torch.randn(2, 8, generator=g)
    pos = torch.zeros(2, 30, dtype=torch.bool)
    pos[0, :4], pos[1, 7:9] = True, True
    full = cal_terms(f, pos, t, 0.1, 0.2, max_pixels=0)
    capped = cal_terms(f, pos, t, 0.1, 0.2, max_pixels=64)
    for a, b in zip(full, capped):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)


def test_cal_loss_falls_when_trained():
    torch.manual_seed(0)
    task = build_task(tiny_config(**{"loss.cal": 1.0, "loss.cal_pixels": 0, "model.mask_grounding.enabled": False}))
    opt = torch.optim.AdamW(task.parameters(), lr=3e-3)
    b = tiny_batch()
    first = None
    for _ in range(8):
        out = task(b)
        first = first if first is not None else out["cal"].item()
        opt.zero_grad()
        out["cal"].backward()
        opt.step()
    assert out["cal"].item() < 0.8 * first
    assert out["cal"].item() == pytest.approx(out["cal_p2p"].item() + out["cal_p2t"].item(), rel=1e-5)


# ------------------------------------------------------------------------------------------ CAM
def test_cam_starts_as_the_identity_and_follows_its_formula():
    import torch.nn.functional as F

    torch.manual_seed(0)
    cfg = tiny_config(**{"model.cam": True, "model.cam_pools": [1, 2]})
    model = build_model(cfg.model).eval()
    b = tiny_batch()
    with_cam = model(b["image"], b["text_ids"], b["text_mask"])
    cam, model.cam = model.cam, None
    without = model(b["image"], b["text_ids"], b["text_mask"])
    assert torch.allclose(with_cam["boxes"], without["boxes"]) and torch.equal(with_cam["text"], without["text"])
    # the formula with non-zero output layers, composed here from the module's own pieces
    for lin in (cam.text_out[-1], cam.vis_out[-1]):
        nn.init.normal_(lin.weight, std=0.3)
    text, mask = without["text"], b["text_mask"]
    visual, hw = model.vision(b["image"], text, mask)
    B, _, C = visual.shape
    o_parts, p_parts = [], []
    for k, proj, t2p, p2t in zip([1, 2], cam.pyramid, cam.t2p, cam.p2t):
        grid = visual.transpose(1, 2).reshape(B, C, *hw)
        pk = proj(F.avg_pool2d(grid, k, ceil_mode=True).flatten(2).transpose(1, 2))
        o_parts.append(t2p(text, pk, pk)[0])
        pt = p2t(pk, text, text, key_padding_mask=~mask.bool())[0]
        size = (math.ceil(hw[0] / k), math.ceil(hw[1] / k))
        p_parts.append(F.interpolate(pt.transpose(1, 2).reshape(B, C, *size), size=hw, mode="bilinear",
                                     align_corners=False).flatten(2).transpose(1, 2))
    v2, t2 = cam(visual, hw, text, mask)
    assert torch.allclose(t2, text + torch.tanh(cam.text_out(torch.cat(o_parts, -1))), atol=1e-5)
    assert torch.allclose(v2, visual + torch.tanh(cam.vis_out(torch.cat(p_parts, -1))), atol=1e-5)
    assert not torch.allclose(v2, visual)


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("override, key", [
    ("loss.mrc=-1", "loss.mrc"), ("loss.mrc_momentum=1.0", "loss.mrc_momentum"), ("loss.cal=-0.5", "loss.cal"),
    ("loss.cal_tau_pixel=0", "loss.cal_tau_pixel"), ("loss.cal_pixels=-1", "loss.cal_pixels"),
    ("loss.dat=maybe", "loss.dat"), ("model.cam=2", "model.cam"), ("model.cam_pools=[0]", "model.cam_pools"),
    ("model.attn_layers=[1,1]", "model.attn_layers"), ("model.cam_heads=0", "model.cam_heads")])
def test_bad_option_values_are_one_line_errors(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(FinetuneConfig, None, [override])
    assert key in str(e.value) and "\n" not in str(e.value)


def test_attn_layer_beyond_the_vit_and_cam_heads_not_dividing_are_config_errors():
    with pytest.raises(ConfigError, match="model.attn_layers: block 7"):
        build_task(tiny_config(**{"model.attn_layers": [7]}))
    with pytest.raises(ConfigError, match="model.cam_heads"):
        build_task(tiny_config(**{"model.cam": True, "model.cam_heads": 5}))


@pytest.mark.parametrize("name", ["refcoco.yaml", "refcoco+.yaml", "refcocog.yaml", "refclef.yaml"])
def test_paper_configs_leave_the_options_off(name):
    cfg = load_config(FinetuneConfig, ROOT / "configs" / "finetune" / name)
    assert (cfg.loss.mrc, cfg.loss.dat, cfg.loss.cal, cfg.model.cam, cfg.model.attn_layers) == (0, False, 0, False, [])


# ------------------------------------------------------------------------------------------ real loop
def run(out_dir: Path, *overrides: str) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, str(RUN), str(out_dir), *overrides], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("overrides, logged", [
    (["loss.mrc=1.0", "loss.mrc_momentum=0.9"], ["mrc"]),
    (["loss.dat=true", "loss.rac=1.0"], ["dat_box", "dat_weight", "rac"]),
    (["loss.cal=0.5"], ["cal", "cal_p2p", "cal_p2t"]),
    (["model.cam=true"], []),
    (["model.attn_layers=[1,3]", "loss.rac=1.0", "loss.mrc=1.0"], ["rac", "mrc"]),
])
def test_each_option_trains_through_the_loop(tmp_path, overrides, logged):
    rows = [r for r in run(tmp_path / "run", "optim.total_steps=2", *overrides) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ["loss", *logged])
    if "dat_box" in logged:
        assert "l1" in rows[0] and "giou" in rows[0]        # still logged, unweighted


RESUME_ENGINES = {"plain": [], "zero1": ["engine.deepspeed=true", "engine.zero_stage=1"],
                  "zero2": ["engine.deepspeed=true", "engine.zero_stage=2"]}


@pytest.mark.parametrize("engine", list(RESUME_ENGINES))
def test_mrc_resume_repeats_the_uninterrupted_run_ema_included(tmp_path, engine):
    opts = ["loss.mrc=1.0", "loss.mrc_momentum=0.5", "loss.rac=1.0", "loss.dat=true", "model.attn_layers=[2]",
            "engine.precision=fp32", *RESUME_ENGINES[engine]]
    full = run(tmp_path / "full", *opts)
    run(tmp_path / "cut", *opts, "optim.total_steps=2")
    resumed = run(tmp_path / "cut", *opts)
    assert any(r.get("event") == "resume" and r["step"] == 2 for r in resumed)
    ref = {r["step"]: r for r in full if "loss" in r}
    got = {r["step"]: r for r in resumed if "loss" in r}
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        for k in ("loss", "mrc", "rac", "dat_box"):
            assert got[step][k] == pytest.approx(ref[step][k], rel=1e-6, abs=1e-9), (step, k)
    a, b = torch.load(tmp_path / "full" / "final.pt"), torch.load(tmp_path / "cut" / "final.pt")
    ema = [k for k in a if k.startswith("momentum.") and k != "momentum.initialised"]
    assert ema and all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)
    # the EMA moved away from its initial copy and is not the live model either
    assert not all(torch.allclose(a[k], a["model." + k[len("momentum."):].replace("__", ".")]) for k in ema)
