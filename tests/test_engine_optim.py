"""AdamW parameter groups (no decay on norms/biases/embeddings/tokens, lr multipliers) and the step schedule."""
import pytest
import torch
from torch import nn

from pretrain.config import OptimConfig
from pretrain.optim import build_optimizer, build_scheduler, lr_factor, param_groups


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.word_embeddings = nn.Embedding(10, 4)
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
        self.temp = nn.Parameter(torch.ones([1]))
        self.block = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.patch = nn.Conv2d(3, 4, 2)
        self.itm_head = nn.Linear(4, 2)

    def lr_multipliers(self):
        return {"itm_head.": 2.0}


def test_groups_split_decay_and_multipliers():
    cfg = OptimConfig(lr=1e-4, weight_decay=0.01)
    groups = param_groups(Toy(), cfg, Toy().lr_multipliers())
    by_name = {n: (g["weight_decay"], g["lr_mult"], g["lr"]) for g in groups for n in g["names"]}
    assert by_name["block.0.weight"] == (0.01, 1.0, 1e-4)
    assert by_name["patch.weight"] == (0.01, 1.0, 1e-4)            # conv kernels decay
    for name in ("word_embeddings.weight", "pos_embed", "temp", "block.0.bias", "block.1.weight", "block.1.bias",
                 "patch.bias"):
        assert by_name[name][0] == 0.0, name
    assert by_name["itm_head.weight"] == (0.01, 2.0, 2e-4)
    assert by_name["itm_head.bias"] == (0.0, 2.0, 2e-4)
    assert sum(len(g["params"]) for g in groups) == len(list(Toy().parameters()))


def test_optimizer_keeps_group_multipliers_under_the_schedule():
    cfg = OptimConfig(lr=1e-3, warmup_steps=2, total_steps=6)
    opt = build_optimizer(Toy(), cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(6):
        lrs.append({g["lr_mult"]: g["lr"] for g in opt.param_groups})
        opt.step()
        sched.step()
    assert [round(x[1.0] / 1e-3, 6) for x in lrs] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert all(x[2.0] == pytest.approx(2 * x[1.0]) for x in lrs)


@pytest.mark.parametrize("schedule, expect", [
    ("linear", [0.25, 0.5, 0.75, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]),
    ("cosine", [0.25, 0.5, 0.75, 1.0, 1.0, 0.853553, 0.5, 0.146447, 0.0]),
    ("constant", [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("step", [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 0.1, 0.1, 0.1]),
])
def test_schedules_in_steps(schedule, expect):
    cfg = OptimConfig(warmup_steps=4, total_steps=8, schedule=schedule, step_milestones=[6], step_gamma=0.1)
    assert [round(lr_factor(s, cfg), 6) for s in range(9)] == expect


def test_min_lr_ratio_floor():
    cfg = OptimConfig(warmup_steps=0, total_steps=10, schedule="linear", min_lr_ratio=0.1)
    assert lr_factor(10, cfg) == pytest.approx(0.1) and lr_factor(0, cfg) == pytest.approx(1.0)
