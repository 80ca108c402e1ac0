"""Benchmark: one X-VLM pretraining step (all four losses, image + region level) beside the bare encoders.

    python bench/pretrain_step.py                       # tiny config on the CPU (< 1 min)
    python bench/pretrain_step.py --device cuda --model base --batch 128 --precision bf16 --compile

`base` is ViT-B/16 at 224 px + BERT-base split 6 text + 6 fusion layers, text length 40. A step is forward +
backward + AdamW on a fixed synthetic batch in the pretraining batch contract (pretrain/fake_batch.py), with
region sub-batches in the config's default ratio (region_texts = 2 x batch, region_images = 3/4 x batch).
The bare encoders are the same timm ViT + transformers' BertModel (12 layers) forward/backward on the batch's
images and captions, with the same optimizer, precision and compile settings, in the same run.
MFU = analytic FLOPs per sample (pretrain/flops.py, forward + 2x for backward, no recompute) x samples/s /
peak; the default peak is the H100 SXM's dense bf16 989 TFLOP/s (pass --peak-tflops for other devices; on a
CPU mfu is null unless given). The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from pretrain.config import PretrainConfig, load_config  # noqa: E402
from pretrain.encoders import build_vision_encoder, vision_tokens  # noqa: E402
from pretrain.fake_batch import random_batch  # noqa: E402
from pretrain.flops import bert_layer, vision_forward  # noqa: E402
from pretrain.task import build_task  # noqa: E402

H100_BF16_DENSE = 989e12
PRESETS = {
    "tiny": ["model.vision.name=vit_tiny_patch16_224", "model.vision.img_size=64",
             "model.vision.timm_kwargs={depth: 4}", "model.text.vocab_size=1000", "model.text.hidden_size=96",
             "model.text.num_layers=4", "model.text.num_heads=4", "model.text.intermediate_size=192",
             "model.text.text_layers=2", "model.text.max_len=16"],
    "base": ["model.vision.name=vit_base_patch16_224", "model.vision.img_size=224", "model.text.max_len=40"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--batch", type=int, default=None, help="image-text pairs per step (tiny 8, base 128)")
    p.add_argument("--region-texts", type=int, default=None, help="default 2 x batch")
    p.add_argument("--region-images", type=int, default=None, help="default 3/4 x batch")
    p.add_argument("--text-len", type=int, default=None, help="tokens per text (tiny 16, base 40)")
    p.add_argument("--precision", choices=["fp32", "bf16", "bf16-weights"], default=None,
                   help="bf16: autocast over fp32 weights; bf16-weights: the model and batch cast to bf16, no "
                        "autocast (what DeepSpeed's bf16 mode runs; its fp32 master copy is not timed here). "
                        "Default bf16 on cuda, else fp32")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile 3 steps and print the top operators by device time")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--sdpa", choices=["auto", "math", "efficient", "cudnn", "flash+efficient"], default="auto",
                   help="restrict F.scaled_dot_product_attention to one backend; flash+efficient: flash where "
                        "there is no mask, memory-efficient where there is (flash takes no padding mask)")
    p.add_argument("--fused-adam", choices=["auto", "on", "off"], default="auto", help="auto: fused on cuda")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first (default 5 with --compile, else base 2, tiny 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (tiny 3, base 20)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for MFU; default 989 (H100 SXM bf16 dense) on cuda, none on cpu")
    p.add_argument("--skip-bare", action="store_true", help="time the full step only")
    p.add_argument("overrides", nargs="*", help="extra dotted config overrides (model.text.num_layers=...)")
    return p.parse_args(argv)


class BareEncoders(nn.Module):
    """The encoders alone: the task's timm ViT config + a full transformers BertModel, summed outputs."""

    def __init__(self, cfg: PretrainConfig):
        super().__init__()
        from transformers import BertConfig, BertModel
        t = cfg.model.text
        self.vision = build_vision_encoder(cfg.model.vision, grad_checkpointing=cfg.model.grad_checkpointing)
        self.img_size = cfg.model.vision.img_size
        bert_cfg = BertConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
                              num_attention_heads=t.num_heads, intermediate_size=t.intermediate_size,
                              max_position_embeddings=max(512, t.max_len), attn_implementation="sdpa")
        self.bert = BertModel(bert_cfg, add_pooling_layer=False)
        if cfg.model.grad_checkpointing:
            self.bert.gradient_checkpointing_enable()

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        v = vision_tokens(self.vision, batch["image"])
        t = self.bert(input_ids=batch["text_ids"], attention_mask=batch["text_mask"]).last_hidden_state
        return {"loss": v.float().mean() + t.float().mean()}

    def flops_per_sample(self, text_len: int) -> float:
        c = self.bert.config
        f = vision_forward(self.vision, self.img_size) + c.num_hidden_layers * bert_layer(text_len, c.hidden_size,
                                                                               c.intermediate_size)
        return 3.0 * f


def sdpa_context(name: str):
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = {"math": [SDPBackend.MATH], "efficient": [SDPBackend.EFFICIENT_ATTENTION],
                "cudnn": [SDPBackend.CUDNN_ATTENTION],
                "flash+efficient": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]}[name]
    return sdpa_kernel(backends)


def time_steps(model: nn.Module, batch: dict, args: argparse.Namespace, device: torch.device) -> dict:
    """Seconds per optimizer step (forward + backward + AdamW) after warm-up, synchronised on cuda."""
    if args.precision == "bf16-weights":
        model.to(torch.bfloat16)
        batch = {k: v.to(torch.bfloat16) if torch.is_floating_point(v) else v for k, v in batch.items()}
    fused = args.fused_adam == "on" or (args.fused_adam == "auto" and device.type == "cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98), weight_decay=0.01, fused=fused)
    run = torch.compile(model) if args.compile else model
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
           else contextlib.nullcontext())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> torch.Tensor:
        with amp, sdpa_context(args.sdpa):
            loss = run(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    out = {"step_s": dt, "warmup_s": warm_s, "loss": float(loss.detach())}
    if device.type == "cuda":
        out["max_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(3):
                step()
            sync()
        key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    base = args.model == "base"
    args.batch = args.batch or (128 if base else 8)
    args.region_texts = 2 * args.batch if args.region_texts is None else args.region_texts
    args.region_images = max(1, 3 * args.batch // 4) if args.region_images is None else args.region_images
    args.text_len = args.text_len or (40 if base else 16)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    args.warmup = args.warmup if args.warmup is not None else (5 if args.compile else (2 if base else 1))
    args.steps = args.steps or (20 if base else 3)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (H100_BF16_DENSE if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    overrides = PRESETS[args.model] + [
        f"data.batch_size={args.batch}", f"data.region_texts={args.region_texts}",
        f"data.region_images={args.region_images}", f"data.max_tokens={args.text_len}",
        f"model.grad_checkpointing={str(args.grad_checkpointing).lower()}"] + args.overrides
    cfg = load_config(PretrainConfig, None, overrides)
    torch.manual_seed(0)
    vocab = cfg.model.text.vocab_size
    batch = random_batch(args.batch, cfg.model.vision.img_size, args.text_len, vocab, args.region_images,
                         args.region_texts, masks_per_text=min(cfg.data.max_masks, args.text_len // 4),
                         device=device, generator=torch.Generator().manual_seed(0))

    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              f"cpu ({torch.get_num_threads()} threads)", "model": args.model, "batch": args.batch,
              "region_texts": args.region_texts, "region_images": args.region_images, "text_len": args.text_len,
              "img_size": cfg.model.vision.img_size, "precision": args.precision, "compile": args.compile,
              "sdpa": args.sdpa, "fused_adam": args.fused_adam, "grad_checkpointing": args.grad_checkpointing,
              "peak_flops": peak, "torch": torch.__version__}

    task = build_task(cfg).to(device)
    fps = task.flops_per_sample(text_len=args.text_len)
    full = time_steps(task, batch, args, device)
    del task
    result.update({"samples_per_s": args.batch / full["step_s"], "step_s": full["step_s"],
                   "flops_per_sample": fps, "mfu": fps * args.batch / full["step_s"] / peak if peak else None,
                   "warmup_s": full["warmup_s"], "max_mem_gb": full.get("max_mem_gb"), "loss": full["loss"]})
    print(f"full step      : {result['samples_per_s']:.1f} samples/s, {full['step_s'] * 1e3:.1f} ms/step, "
          f"{fps / 1e9:.2f} GFLOP/sample, mfu {result['mfu']}", flush=True)

    if not args.skip_bare:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        bare = BareEncoders(cfg).to(device)
        bfps = bare.flops_per_sample(args.text_len)
        image_text = {k: batch[k] for k in ("image", "text_ids", "text_mask")}
        b = time_steps(bare, image_text, args, device)
        result.update({"bare_encoders_samples_per_s": args.batch / b["step_s"],
                       "bare_encoders_step_s": b["step_s"], "bare_encoders_flops_per_sample": bfps,
                       "bare_encoders_mfu": bfps * args.batch / b["step_s"] / peak if peak else None,
                       "full_vs_bare_time_ratio": full["step_s"] / b["step_s"]})
        print(f"bare encoders  : {result['bare_encoders_samples_per_s']:.1f} samples/s, "
              f"{b['step_s'] * 1e3:.1f} ms/step, mfu {result['bare_encoders_mfu']}", flush=True)
    else:
        result["bare_encoders_samples_per_s"] = None
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
