"""Benchmark: VG-LAW training step vs the same ViT with static weights, and evaluation speed.

    python bench/finetune_step.py                          # tiny config on the CPU (< 1 min)
    python bench/finetune_step.py --device cuda --preset base --batch 32   # ViT-B/16 @ 448, 6-layer BERT, bf16

Both models are built in the same process with the same heads and losses (Mask Grounding off in both, so the
ratio isolates the language adaptive weights); their steps alternate so that clock or thermal drift hits
both. A step is forward + backward + AdamW on synthetic batches in the grounding batch contract. The
Mask Grounding step is reported separately, with its default second backbone pass on the masked text and with
`reuse_visual` (the main pass's visual tokens). Evaluation speed is
`model.predict` (forward, sigmoid) in expressions/s. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from finetune.config import FinetuneConfig  # noqa: E402
from finetune.task import build_task  # noqa: E402
from pretrain.config import from_dict  # noqa: E402

PRESETS = {
    "tiny": {"vision": {"name": "vit_tiny_patch16_224", "img_size": 64,
                        "timm_kwargs": {"embed_dim": 96, "depth": 4, "num_heads": 4}},
             "text": {"vocab_size": 1000, "hidden_size": 96, "num_layers": 3, "num_heads": 4,
                      "intermediate_size": 192, "text_layers": 2},
             "window_size": 2, "global_blocks": [1, 3], "law_reduction": 4, "law_rank": 16,
             "mask_grounding": {"dim": 64, "heads": 4, "depth": 1}},
    "base": {"vision": {"name": "vit_base_patch16_224", "img_size": 448},
             "text": {"vocab_size": 30522, "hidden_size": 768, "num_layers": 12, "num_heads": 12,
                      "intermediate_size": 3072, "text_layers": 6}},
}


def make_batch(n: int, size: int, length: int, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000 if vocab > 2000 else 5, vocab, (n, length), generator=g)
    ids[:, 0] = 101 if vocab > 101 else 1
    lengths = torch.randint(length // 3, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    boxes = torch.rand(n, 4, generator=g) * 0.3 + 0.3
    masks = (torch.rand(n, size, size, generator=g) > 0.7).float()
    batch = {"image": torch.randn(n, 3, size, size, generator=g), "text_ids": ids * mask, "text_mask": mask,
             "bbox": boxes, "mask": masks}
    return {k: v.to(device) for k, v in batch.items()}


def build(preset: str, *, law: bool, mask_grounding: bool, device: torch.device, reuse_visual: bool = False):
    model = dict(PRESETS[preset], law=law)
    model["mask_grounding"] = dict(model.get("mask_grounding", {}), enabled=mask_grounding,
                                   reuse_visual=reuse_visual)
    cfg = from_dict(FinetuneConfig, {"model": model, "data": {"image_size": model["vision"]["img_size"]}})
    task = build_task(cfg).to(device)
    return task, torch.optim.AdamW(task.parameters(), lr=1e-5, fused=device.type == "cuda" or None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(task, opt, batch, autocast) -> None:
    with autocast():
        loss = task(batch)["loss"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    hook = getattr(task, "on_optimizer_step", None)     # e.g. the momentum copy of loss.mrc
    if hook is not None:
        hook()


def interleaved_samples_per_s(runs: dict, batch: dict, autocast, device: torch.device, warmup: int, steps: int,
                              batch_size: int) -> dict[str, float]:
    """{name: (task, optimizer)} -> {name: samples/s}: warm-up steps, then `steps` rounds that step every setting
    once in turn (interleaved, so drift in the machine's speed hits every setting alike)."""
    for task, opt in runs.values():
        for _ in range(warmup):
            train_step(task, opt, batch, autocast)
    times = {k: 0.0 for k in runs}
    for _ in range(steps):
        for name, (task, opt) in runs.items():
            sync(device)
            t0 = time.perf_counter()
            train_step(task, opt, batch, autocast)
            sync(device)
            times[name] += time.perf_counter() - t0
    return {k: steps * batch_size / t for k, t in times.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="default: tiny on CPU, base on CUDA")
    ap.add_argument("--batch", type=int, help="per-step batch (default 4 tiny, 32 base)")
    ap.add_argument("--steps", type=int, help="timed steps per model (default 5 tiny, 20 base)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--text-len", type=int, default=40)
    ap.add_argument("--compile", action="store_true", help="torch.compile each task")
    ap.add_argument("--precision", choices=["bf16", "fp32"], help="default bf16 on CUDA, fp32 on CPU")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    preset = args.preset or ("base" if device.type == "cuda" else "tiny")
    batch_size = args.batch or (32 if preset == "base" else 4)
    steps = args.steps or (20 if preset == "base" else 5)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    torch.manual_seed(0)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    size = PRESETS[preset]["vision"]["img_size"]
    vocab = PRESETS[preset]["text"]["vocab_size"]
    batch = make_batch(batch_size, size, args.text_len, vocab, device)
    runs = {"law": build(preset, law=True, mask_grounding=False, device=device),
            "static": build(preset, law=False, mask_grounding=False, device=device),
            "law_mg": build(preset, law=True, mask_grounding=True, device=device),
            "law_mg_reuse": build(preset, law=True, mask_grounding=True, device=device, reuse_visual=True)}
    if args.compile:
        runs = {k: (torch.compile(task), opt) for k, (task, opt) in runs.items()}
    sps = interleaved_samples_per_s(runs, batch, autocast, device, args.warmup, steps, batch_size)

    model = getattr(runs["law"][0], "_orig_mod", runs["law"][0]).model.eval()
    with torch.no_grad(), autocast():
        for _ in range(args.warmup):
            model.predict(batch["image"], batch["text_ids"], batch["text_mask"])
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            model.predict(batch["image"], batch["text_ids"], batch["text_mask"])
        sync(device)
        eval_eps = steps * batch_size / (time.perf_counter() - t0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    result = {"device": name, "preset": preset, "image_size": size, "batch": batch_size, "precision": precision,
              "steps": steps, "compile": args.compile, "samples_per_s": round(sps["law"], 3),
              "static_vit_samples_per_s": round(sps["static"], 3), "ratio": round(sps["law"] / sps["static"], 4),
              "mask_grounding_samples_per_s": round(sps["law_mg"], 3),
              "mask_grounding_reuse_visual_samples_per_s": round(sps["law_mg_reuse"], 3),
              "eval_expressions_per_s": round(eval_eps, 3)}
    print(f"VG-LAW step        {sps['law']:9.2f} samples/s")
    print(f"static ViT step    {sps['static']:9.2f} samples/s   (ratio {result['ratio']:.3f}, goal >= 0.9)")
    print(f"VG-LAW + MaskGr.   {sps['law_mg']:9.2f} samples/s   (second backbone pass on the masked text)")
    print(f"  reuse_visual     {sps['law_mg_reuse']:9.2f} samples/s   (main pass's visual tokens)")
    print(f"evaluation         {eval_eps:9.2f} expressions/s")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
