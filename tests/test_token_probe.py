"""bench/token_probe.py's linear probe: it reads a label that is linear in the features and not one that is not."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from token_probe import linear_probe  # noqa: E402


def test_linear_probe_reads_a_linear_label_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=g)
    colour = ["red" if v > 0 else "blue" for v in x[:, 3].tolist()]                   # linear in feature 3
    noise = ["a", "b", "c", "d"] * 100                                                 # unrelated to x
    r = linear_probe(x[:300], colour[:300], x[300:], colour[300:])
    assert r["val"] > 0.9 and r["chance"] == 0.5 and r["classes"] == 2
    r = linear_probe(x[:300], noise[:300], x[300:], noise[300:])
    assert r["val"] < 0.45 and r["chance"] == 0.25
    r = linear_probe(x[:300], colour[:300], x[300:], ["green"] * 100)                 # unseen class: never right
    assert r["val"] == 0.0
