"""Engine overhead: the X-VLM pretraining step under DeepSpeed (ZeRO-0/2/3, one process) vs a bare PyTorch loop
on the same model and batches; and peak GPU memory per configuration (ViT-L/16 + BERT-large under ZeRO-3 +
activation checkpointing vs ZeRO-0).

    python bench/engine_overhead.py                                   # CPU, tiny model, bare vs ZeRO-0 vs ZeRO-2
    python bench/engine_overhead.py --device cuda --model base        # ViT-B/16 + BERT-base 6+6, batch 64, bf16
    python bench/engine_overhead.py --device cuda --model large --batch 32 --configs zero0,zero3+ckpt

Each configuration builds the model afresh from the same seed and runs `--warmup` untimed and `--steps` timed
steps on the same random batches (pretrain.fake_batch: the loader's batch contract). On CPU the configurations
run side by side, one step of each in turn, so a shared machine's load changes hit them alike; on CUDA they run
one after another so each peak memory is its own. The bare loop is
forward -> backward -> clip -> torch AdamW -> LambdaLR with autocast for bf16 (what one would write without
DeepSpeed); the DeepSpeed rows use the engine exactly as pretrain.engine.train builds it. A configuration that
runs out of GPU memory is reported as "oom". Step time is the median over the timed steps. The last line is
one JSON object.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from pretrain import distributed as du  # noqa: E402

MODELS = {
    # name: (overrides, default batch, region texts, region images)
    "tiny": (["model.vision.name=vit_tiny_patch16_224", "model.vision.img_size=32", "model.text.vocab_size=1000",
              "model.text.hidden_size=64", "model.text.num_layers=2", "model.text.text_layers=1",
              "model.text.num_heads=2", "model.text.intermediate_size=128", "model.text.max_len=12",
              "model.embed_dim=32", "data.max_masks=3"], 8, 8, 4),
    "base": (["model.vision.name=vit_base_patch16_224", "model.vision.img_size=224", "model.text.hidden_size=768",
              "model.text.num_layers=12", "model.text.text_layers=6", "model.text.num_heads=12",
              "model.text.intermediate_size=3072", "model.text.max_len=32", "data.max_masks=8"], 64, 128, 48),
    "large": (["model.vision.name=vit_large_patch16_224", "model.vision.img_size=224",
               "model.text.hidden_size=1024", "model.text.num_layers=24", "model.text.text_layers=12",
               "model.text.num_heads=16", "model.text.intermediate_size=4096", "model.text.max_len=32",
               "data.max_masks=8"], 32, 64, 24),
}


def parse_config_name(name: str) -> dict:
    """'bare' | 'zero<k>[+ckpt][+offload]'."""
    if name == "bare":
        return {"deepspeed": False, "stage": None, "ckpt": False, "offload": False}
    parts = name.split("+")
    if not parts[0].startswith("zero") or not parts[0][4:].isdigit():
        raise SystemExit(f"error: bad config name {name!r} (bare, zero0, zero2, zero3+ckpt, zero3+ckpt+offload)")
    return {"deepspeed": True, "stage": int(parts[0][4:]), "ckpt": "ckpt" in parts[1:],
            "offload": "offload" in parts[1:]}


def build(args, spec: dict):
    from pretrain.config import PretrainConfig, load_config
    from pretrain.task import build_task

    overrides, *_ = MODELS[args.model]
    cfg = load_config(PretrainConfig, None, overrides + [
        f"data.batch_size={args.batch}", f"data.region_texts={args.region_texts}",
        f"data.region_images={args.region_images}", f"model.grad_checkpointing={spec['ckpt']}",
        f"engine.precision={args.precision}", "optim.warmup_steps=10", "optim.total_steps=1000"])
    torch.manual_seed(0)
    return cfg, build_task(cfg, cfg.model.text.vocab_size)


def batches(cfg, n: int, device: torch.device):
    from pretrain.fake_batch import random_batch

    g = torch.Generator().manual_seed(0)
    d = cfg.data
    return [random_batch(d.batch_size, cfg.model.vision.img_size, cfg.model.text.max_len, cfg.model.text.vocab_size,
                         region_images=d.region_images, region_texts=d.region_texts, generator=g, device=device)
            for _ in range(n)]


def make_step(args, name: str, device: torch.device):
    """(step function, #params) for one configuration; the step runs forward/backward/update on a batch."""
    from pretrain.ds_config import build_ds_config, plan_batch
    from pretrain.engine import to_device
    from pretrain.optim import build_optimizer, build_scheduler

    spec = parse_config_name(name)
    cfg, task = build(args, spec)
    cfg.engine.zero_stage = spec["stage"] or 0
    cfg.engine.offload_optimizer = spec["offload"]
    params = sum(p.numel() for p in task.parameters())
    args.flops_per_sample = task.flops_per_sample(text_len=cfg.model.text.max_len)
    bf16 = args.precision == "bf16"
    task.to(device)
    opt = build_optimizer(task, cfg.optim, device)
    if spec["deepspeed"]:
        import deepspeed

        engine, *_ = deepspeed.initialize(model=task, optimizer=opt,
                                          lr_scheduler=lambda o: build_scheduler(o, cfg.optim),
                                          config=build_ds_config(cfg.engine, cfg.optim,
                                                                 plan_batch(args.batch, 1, cfg.engine)))
        cast = torch.bfloat16 if bf16 else None

        def step(batch):
            loss = engine(to_device(batch, device, cast))["loss"]
            engine.backward(loss)
            engine.step()
            return float(loss.detach())      # the loop reads the loss every step too (finite check)
    else:
        sched = build_scheduler(opt, cfg.optim)

        def step(batch):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = task(batch)["loss"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(task.parameters(), cfg.optim.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            return float(loss.detach())
    return step, params, cfg


def timed(step, batch, device: torch.device) -> tuple[float, float]:
    sync(device)
    t0 = time.perf_counter()
    loss = step(batch)
    sync(device)
    return time.perf_counter() - t0, loss


def summarize(name: str, params: int, times: list[float], loss: float, args) -> dict:
    med = statistics.median(times)          # the median resists load spikes on a shared machine
    row = {"config": name, "params_M": round(params / 1e6, 2), "step_s": med, "samples_per_s": args.batch / med,
           "final_loss": loss}
    if args.peak_tflops:                    # analytic FLOPs (pretrain/flops.py), no recompute counted
        row["mfu"] = round(args.flops_per_sample * args.batch / med / (args.peak_tflops * 1e12), 4)
    return row


def run_interleaved(args, names: list[str], device: torch.device) -> list[dict]:
    """CPU: all configurations side by side, one step of each in turn, so load changes hit them alike."""
    setups = [make_step(args, n, device) for n in names]
    data = batches(setups[0][2], args.warmup + args.steps, device)
    times: list[list[float]] = [[] for _ in names]
    losses = [0.0] * len(names)
    for i, batch in enumerate(data):
        for k, (step, _, _) in enumerate(setups):
            dt, losses[k] = timed(step, batch, device)
            if i >= args.warmup:
                times[k].append(dt)
    return [summarize(n, s[1], t, loss, args) for n, s, t, loss in zip(names, setups, times, losses)]


def run_alone(args, name: str, device: torch.device) -> dict:
    """CUDA: one configuration at a time, so the peak memory is its own; OOM is reported, not raised."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    params = 0
    try:
        step, params, cfg = make_step(args, name, device)
        data = batches(cfg, args.warmup + args.steps, device)
        times, loss = [], 0.0
        for i, batch in enumerate(data):
            dt, loss = timed(step, batch, device)
            if i >= args.warmup:
                times.append(dt)
        result = summarize(name, params, times, loss, args)
    except torch.OutOfMemoryError:
        result = {"config": name, "params_M": round(params / 1e6, 2), "oom": True}
    result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    step = data = None                       # free this configuration's model before the next one
    gc.collect()
    torch.cuda.empty_cache()
    return result


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="tiny", choices=sorted(MODELS))
    p.add_argument("--configs", default=None,
                   help="comma list of bare | zero<k>[+ckpt][+offload]; default bare,zero0,zero2 "
                        "(large: zero0,zero3+ckpt)")
    p.add_argument("--batch", type=int, default=None, help="image-text samples per step (default per model)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 8 cpu, 20 cuda)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"], help="default fp32 on cpu, bf16 on cuda")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for an MFU column; default 989 (H100 SXM bf16 dense) on cuda, none on cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads on cpu (1 resists oversubscription)")
    args = p.parse_args()
    _, batch, rt, ri = MODELS[args.model]
    args.batch = args.batch or batch
    args.region_texts = rt * args.batch // batch
    args.region_images = max(1, ri * args.batch // batch)
    args.steps = args.steps or (8 if args.device == "cpu" else 20)
    args.precision = args.precision or ("fp32" if args.device == "cpu" else "bf16")
    if args.peak_tflops is None and args.device == "cuda":
        args.peak_tflops = 989.0
    configs = (args.configs or ("zero0,zero3+ckpt" if args.model == "large" else "bare,zero0,zero2")).split(",")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is visible")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    info, device = du.init_distributed()
    if info.world_size != 1:
        raise SystemExit("error: run this benchmark as one process")

    if device.type == "cuda":
        rows = []
        for name in configs:
            rows.append(run_alone(args, name, device))
            print(json.dumps(rows[-1]), flush=True)
    else:
        rows = run_interleaved(args, configs, device)
        for row in rows:
            print(json.dumps(row))
    ref = next((r for r in rows if r["config"] == "bare" and "step_s" in r), None) or \
        next((r for r in rows if "step_s" in r), None)
    ratios = {r["config"]: round(r["step_s"] / ref["step_s"], 3) for r in rows if "step_s" in r} if ref else {}
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} cpu, {torch.get_num_threads()} threads"
    print(f"step time relative to {ref['config'] if ref else '-'}: {ratios}")
    print(json.dumps({"bench": "engine_overhead", "device": args.device, "machine": machine, "model": args.model,
                      "batch": args.batch, "precision": args.precision, "steps": args.steps,
                      "reference": ref["config"] if ref else None, "step_time_ratio": ratios, "rows": rows}))


if __name__ == "__main__":
    main()
