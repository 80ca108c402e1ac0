"""Benchmark: the cost of each optional loss/module of the VG-LAW task (issue #16) against the default.

    python bench/finetune_options.py                       # tiny config on the CPU (about a minute)
    python bench/finetune_options.py --device cuda --preset base --batch 32

Settings, each a set of dotted overrides on the default task (Mask Grounding on, as in the paper configs):
default; AttBalance's RAC, MRC (momentum model: one more forward pass without gradient + the EMA update), DAT
(on top of RAC), RAC + MRC over two more per-block LAP maps; MagNet's CAL and CAM. A step is forward +
backward + AdamW + `task.on_optimizer_step()` (the EMA update) on one synthetic batch; the settings' steps
alternate so drift hits all alike. Prints samples/s side by side; the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.finetune_step import PRESETS, interleaved_samples_per_s, make_batch  # noqa: E402
from finetune.config import FinetuneConfig  # noqa: E402
from finetune.task import build_task  # noqa: E402
from pretrain.config import apply_overrides, from_dict  # noqa: E402

SETTINGS = {
    "default": [],
    "rac": ["loss.rac=1"],
    "mrc": ["loss.mrc=1"],
    "rac+dat": ["loss.rac=1", "loss.dat=true"],
    "rac+mrc+layers": ["loss.rac=1", "loss.mrc=1", "model.attn_layers=[1,2]"],
    "cal": ["loss.cal=1"],
    "cam": ["model.cam=true"],
}


def build(preset: str, overrides: list[str], device: torch.device):
    model = PRESETS[preset]
    data = {"model": dict(model), "data": {"image_size": model["vision"]["img_size"]}}
    cfg = from_dict(FinetuneConfig, apply_overrides(data, list(overrides)))
    task = build_task(cfg).to(device)
    return task, torch.optim.AdamW(task.parameters(), lr=1e-5, fused=device.type == "cuda" or None)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="default: tiny on CPU, base on CUDA")
    ap.add_argument("--batch", type=int, help="per-step batch (default 4 tiny, 32 base)")
    ap.add_argument("--steps", type=int, help="timed steps per setting (default 15 tiny, 20 base)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--text-len", type=int, default=20)
    ap.add_argument("--only", nargs="*", choices=sorted(SETTINGS), help="a subset of the settings (default all)")
    ap.add_argument("--precision", choices=["bf16", "fp32"], help="default bf16 on CUDA, fp32 on CPU")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    preset = args.preset or ("base" if device.type == "cuda" else "tiny")
    batch_size = args.batch or (32 if preset == "base" else 4)
    steps = args.steps or 20 if preset == "base" else args.steps or 15
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    torch.manual_seed(0)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    size = PRESETS[preset]["vision"]["img_size"]
    batch = make_batch(batch_size, size, args.text_len, PRESETS[preset]["text"]["vocab_size"], device)
    names = ["default"] + [n for n in (args.only or SETTINGS) if n != "default"]
    runs = {n: build(preset, SETTINGS[n], device) for n in names}
    sps = interleaved_samples_per_s(runs, batch, autocast, device, args.warmup, steps, batch_size)
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{'setting':16s} {'samples/s':>10s} {'vs default':>10s}   overrides")
    for n in runs:
        print(f"{n:16s} {sps[n]:10.2f} {sps[n] / sps['default']:10.3f}   {' '.join(SETTINGS[n]) or '-'}")
    result = {"device": dev, "preset": preset, "image_size": size, "batch": batch_size, "precision": precision,
              "steps": steps, "samples_per_s": {n: round(v, 3) for n, v in sps.items()},
              "ratio_to_default": {n: round(v / sps["default"], 4) for n, v in sps.items()}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
