"""End to end: `python -m pretrain` as users run it (engine, loader with workers, shards stored at 448 px) for a
fixed number of steps, beside the bare compiled PyTorch loop on the same task and batches (`--vs`).

    python bench/pretrain_e2e.py --vs                          # CPU, tiny model, about a minute
    python bench/pretrain_e2e.py --device cuda --model base --workers 14 --compile --vs \\
        --backend deepspeed,ddp --zero 0,2                     # one GPU: every engine variant, then the bare loop

Data: COCO-like shards (bench/loader.py's photo-like JPEGs with captions and object regions, written as
shards.build writes them) with a longer side of `--max-side` (448), in a temp dir. `base` is
configs/pretrain/xvlm_base_4m.yaml as it is (ViT-B/16 at 224, BERT-base 6 + 6, batch 64, 128 region texts over
48 region images, bf16, text length 40) with randomly initialised weights and a WordPiece vocabulary padded to
bert-base-uncased's 30,522 entries (the MLM head costs what it costs with BERT); `tiny` is the same config
with the smoke model. Each engine variant (`--backend` x `--zero`; ddp has no ZeRO stage) is one
`python -m pretrain --config <base yaml> k=v ...` child process with `run.log_every=1`; the first `--warmup`
steps are dropped, the rest are summed from its metrics.jsonl:
- samples_per_s: image-text samples / wall time of the timed steps (data wait included), per GPU;
- data_time_share: time waiting for the loader / step time (what GPU decoding or more workers would remove);
- compute_samples_per_s: samples / (step time - data time), the engine without its input wait;
- mfu: the engine's own figure (pretrain/flops.py, peak from pretrain.tracking; null where the peak is unknown);
- peak_mem_gib: max allocated GPU memory the engine logs (null on a CPU; peak_rss_gib is the child's RSS).
`--vs`: the bare loop in this process: the same task built from the same config, `--vs-batches` batches taken
from the same loader and kept on the device, torch AdamW with the engine's parameter groups, clip, schedule;
precision as the engine computes (DeepSpeed bf16 = bf16 weights and batch; ddp bf16 = autocast over fp32
weights), compiled when the engine is (`--compile`). `engine_vs_bare` = samples_per_s / bare_samples_per_s and
`compute_vs_bare` the same without the data wait. The last line is one JSON object (first variant's figures
at the top level, every variant under "variants").
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BASE_CONFIG = ROOT / "configs" / "pretrain" / "xvlm_base_4m.yaml"
BERT_VOCAB = 30522
TINY = ["model.vision.name=vit_tiny_patch16_224", "model.vision.img_size=64", "model.vision.drop_path_rate=0.0",
        "model.vision.timm_kwargs={depth: 4}", "model.text.hidden_size=96", "model.text.num_layers=4",
        "model.text.num_heads=4", "model.text.intermediate_size=192", "model.text.text_layers=2",
        "model.text.max_len=16", "model.embed_dim=32", "data.image_size=64", "data.max_words=12",
        "data.max_tokens=16", "data.max_masks=3"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default=None, choices=["tiny", "base"], help="default tiny on cpu, base on cuda")
    p.add_argument("--batch", type=int, default=None, help="image-text samples per GPU (tiny 8, base: the config's 64)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 8 cpu, 30 cuda)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 2; 6 with --compile)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default 1 cpu, 14 cuda)")
    p.add_argument("--images", type=int, default=None, help="images in the built shards (default 96 cpu, 1024 cuda)")
    p.add_argument("--max-side", type=int, default=448, help="stored longer side of the built JPEGs (4:3)")
    p.add_argument("--backend", default="deepspeed", help="comma list of deepspeed | ddp")
    p.add_argument("--zero", default=None, help="comma list of ZeRO stages for deepspeed (default: the config's 2)")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"], help="default fp32 cpu, bf16 cuda")
    p.add_argument("--compile", action="store_true", help="engine.compile=true (and a compiled bare loop)")
    p.add_argument("--decode-on", default="cpu", choices=["cpu", "gpu"], help="data.decode_on for the engine runs")
    p.add_argument("--vs", action="store_true", help="also time the bare PyTorch loop on the same task and batches")
    p.add_argument("--vs-batches", type=int, default=4, help="loader batches the bare loop cycles through")
    p.add_argument("--threads", type=int, default=1, help="torch threads on cpu (OMP_NUM_THREADS of the runs)")
    p.add_argument("--work", type=Path, default=None, help="keep shards and runs here (default: a temp dir)")
    p.add_argument("overrides", nargs="*", help="extra dotted overrides for every engine run and the bare loop")
    a = p.parse_args(argv)
    cuda = a.device == "cuda"
    a.model = a.model or ("base" if cuda else "tiny")
    a.steps = a.steps or (30 if cuda else 8)
    a.warmup = a.warmup if a.warmup is not None else (6 if a.compile else 2)
    a.workers = a.workers if a.workers is not None else (14 if cuda else 1)
    a.images = a.images or (1024 if cuda else 96)
    a.precision = a.precision or ("bf16" if cuda else "fp32")
    a.backends = [b.strip() for b in a.backend.split(",") if b.strip()]
    bad = [b for b in a.backends if b not in ("deepspeed", "ddp")]
    if bad:
        p.error(f"--backend: unknown {bad[0]!r} (deepspeed, ddp)")
    if a.zero:
        a.zeros = [int(z) for z in a.zero.split(",")]
    else:
        from pretrain.config import PretrainConfig, load_config
        a.zeros = [load_config(PretrainConfig, BASE_CONFIG).engine.zero_stage]
    return a


def variants(a: argparse.Namespace) -> list[dict]:
    out = []
    for b in a.backends:
        if b == "ddp":
            out.append({"name": "ddp", "backend": "ddp", "zero": None})
        else:
            out += [{"name": f"deepspeed-zero{z}", "backend": "deepspeed", "zero": z}
                    for z in a.zeros]
    return out


def build_data(a: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """(shard dir, tokenizer dir): photo-like JPEGs at --max-side, and a vocabulary of bench/loader.py's words
    (padded to BERT's size for the base model)."""
    from loader import WORDS, build_shards

    from shards.text import build_vocab_tokenizer

    shards = work / "shards" / "coco"
    if not (shards / "manifest.json").is_file():
        t = time.perf_counter()
        per_shard = max(8, a.images // max(2, 2 * a.workers))      # every worker gets shards of its own
        build_shards(shards, a.images, per_shard, (a.max_side, round(a.max_side * 3 / 4)))
        print(f"built {a.images} JPEGs {a.max_side}x{round(a.max_side * 3 / 4)} in {time.perf_counter() - t:.1f}s",
              flush=True)
    tok = work / ("tokenizer_bert" if a.model == "base" else "tokenizer")
    if not (tok / "vocab.txt").is_file():
        n = len(build_vocab_tokenizer(WORDS, tok))
        fill = BERT_VOCAB - n - 22 if a.model == "base" else 0   # filler words (their characters add <= 22)
        while fill > 0:
            n = len(build_vocab_tokenizer(list(WORDS) + [f"zz{i:05d}" for i in range(fill)], tok))
            if n == BERT_VOCAB:
                break
            fill += BERT_VOCAB - n
    return shards, tok


def overrides(a: argparse.Namespace, shards: Path, tok: Path, out: Path, v: dict | None, total_steps: int) -> list[str]:
    o = TINY[:] if a.model == "tiny" else []
    if a.model == "tiny":
        batch = a.batch or 8
        o += [f"data.batch_size={batch}", f"data.region_texts={2 * batch}", f"data.region_images={max(1, batch // 2)}"]
    elif a.batch:
        o += [f"data.batch_size={a.batch}", f"data.region_texts={2 * a.batch}",
              f"data.region_images={max(1, 3 * a.batch // 4)}"]
    try:
        import simplejpeg  # noqa: F401
        decoder = "simplejpeg"
    except ImportError:
        decoder = "pil"
    o += ["model.text.bert=null", f"model.text.tokenizer={tok}",
          f"data.sources=[{{name: coco, shards: {shards}, weight: 1.0}}]", f"data.num_workers={a.workers}",
          f"data.decoder={decoder}", "data.shuffle_buffer=256", f"data.batches_per_epoch={total_steps + 10}",
          "engine.global_batch_size=null", "engine.grad_accum=1", f"engine.precision={a.precision}",
          f"engine.compile={'true' if a.compile else 'false'}",
          f"optim.total_steps={total_steps}", "optim.warmup_steps=5",
          f"run.out_dir={out}", "run.resume=null", "run.export=false", "run.log_every=1",
          f"run.save_every={10 ** 9}", "run.wandb.mode=disabled"]
    if a.decode_on != "cpu":
        o.append(f"data.decode_on={a.decode_on}")
    if v is not None:
        o.append(f"engine.backend={v['backend']}")
        if v["zero"] is not None:
            o.append(f"engine.zero_stage={v['zero']}")
    return o + a.overrides


def child_env(a: argparse.Namespace) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if a.device == "cpu":
        env["OMP_NUM_THREADS"] = str(a.threads)
        env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    return env


def run_engine(a: argparse.Namespace, v: dict, shards: Path, tok: Path, work: Path) -> dict:
    """One `python -m pretrain` child process; its figures over the timed steps."""
    out = work / "runs" / f"{os.getpid()}-{v['name']}"          # fresh per invocation (resume=null refuses reuse)
    total = a.warmup + a.steps
    cmd = [sys.executable, "-m", "pretrain", "--config", str(BASE_CONFIG),
           *overrides(a, shards, tok, out, v, total)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=child_env(a), capture_output=True, text=True, cwd=str(ROOT))
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        print(f"{v['name']}: python -m pretrain exited with {r.returncode}: {tail}", flush=True)
        return {"variant": v["name"], "error": tail[:300], "returncode": r.returncode}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [x for x in rows if "samples_per_s_gpu" in x and x["step"] > a.warmup]
    step_s = sum(x["step_time"] for x in rows)
    data_s = sum(x["data_time"] for x in rows)
    samples = sum(x["samples_per_s_gpu"] * x["step_time"] for x in rows)
    sps = samples / step_s
    mfu = None
    if rows and rows[0].get("mfu") is not None:          # mfu / sps = flops per sample / peak, the same each step
        mfu = rows[0]["mfu"] / rows[0]["samples_per_s_gpu"] * sps
    compile_stats = {k: rows[-1][k] for k in rows[-1] if k.startswith("compile/")} if rows else {}
    shutil.rmtree(out / "checkpoints", ignore_errors=True)     # the final save: gigabytes for the base model
    res = {"variant": v["name"], "backend": v["backend"], "zero_stage": v["zero"], "steps": len(rows),
           "samples_per_s": sps, "compute_samples_per_s": samples / max(step_s - data_s, 1e-9),
           "data_time_share": data_s / step_s, "step_s": step_s / len(rows), "mfu": mfu,
           "peak_mem_gib": max((x.get("max_mem_gib", 0.0) for x in rows), default=None) if a.device == "cuda" else None,
           "final_loss": rows[-1]["loss"], "wall_s": wall, **compile_stats}
    print(f"{v['name']}: {sps:.1f} samples/s, data wait {100 * res['data_time_share']:.1f}%, mfu {mfu}", flush=True)
    return res


def bare_loop(a: argparse.Namespace, shards: Path, tok: Path, work: Path, engine_backend: str) -> dict:
    """The bare PyTorch loop on the same task, config and loader batches (held on the device)."""
    import contextlib

    import torch

    from pretrain.config import PretrainConfig, load_config
    from pretrain.optim import build_optimizer, build_scheduler
    from pretrain.task import build_task
    from shards.stream import build_pretrain_loader
    from shards.text import build_tokenizer

    device = torch.device(a.device)
    if device.type == "cpu":
        torch.set_num_threads(a.threads)
    total = a.warmup + a.steps
    cfg = load_config(PretrainConfig, BASE_CONFIG, overrides(a, shards, tok, work / "runs" / "bare", None, total))
    cfg.data.num_workers = 0                    # a few batches, read in this process
    if hasattr(cfg.data, "decode_on"):
        cfg.data.decode_on = "cpu"              # the bare loop's batches are decoded already
    tokenizer = build_tokenizer(tok)
    loader = build_pretrain_loader(cfg.data, tokenizer, rank=0, world_size=1, epoch=0, seed=cfg.run.seed)
    it = iter(loader)
    batches = [next(it) for _ in range(a.vs_batches)]
    del it, loader
    torch.manual_seed(cfg.run.seed)
    task = build_task(cfg, len(tokenizer)).to(device)
    bf16_weights = a.precision == "bf16" and engine_backend == "deepspeed"
    if bf16_weights:
        task.to(torch.bfloat16)
    cast = torch.bfloat16 if bf16_weights else None
    batches = [{k: (v.to(device).to(cast) if cast is not None and v.is_floating_point() else v.to(device))
                for k, v in b.items()} for b in batches]
    opt = build_optimizer(task, cfg.optim, device)
    sched = build_scheduler(opt, cfg.optim)
    if a.compile:
        task.compile()
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if a.precision == "bf16" and not bf16_weights
           else contextlib.nullcontext())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(batch) -> float:
        with amp:
            loss = task(batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        return float(loss.detach())                 # the engine reads the loss every step too

    for i in range(a.warmup):
        step(batches[i % len(batches)])
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(a.steps):
        loss = step(batches[i % len(batches)])
    sync()
    dt = time.perf_counter() - t0
    n = a.steps * int(batches[0]["image"].shape[0])
    res = {"bare_samples_per_s": n / dt, "bare_step_s": dt / a.steps, "bare_loss": loss,
           "bare_precision": ("bf16 weights" if bf16_weights else "autocast bf16") if a.precision == "bf16" else "fp32",
           "bare_compiled": a.compile,
           "bare_peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None}
    print(f"bare loop: {res['bare_samples_per_s']:.1f} samples/s ({res['bare_precision']}, "
          f"compiled={a.compile})", flush=True)
    return res


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is visible")
    tmp = None
    if a.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="pretrain_e2e_")
        work = Path(tmp.name)
    else:
        work = a.work
        work.mkdir(parents=True, exist_ok=True)
    shards, tok = build_data(a, work)
    rows = [run_engine(a, v, shards, tok, work) for v in variants(a)]
    for r in rows:
        r["hours_205M_on_8"] = 205e6 / (8 * r["samples_per_s"]) / 3600 if r.get("samples_per_s") else None
    bare = bare_loop(a, shards, tok, work, a.backends[0]) if a.vs else {}
    for r in rows:
        if bare and r.get("samples_per_s"):
            r["engine_vs_bare"] = r["samples_per_s"] / bare["bare_samples_per_s"]
            r["compute_vs_bare"] = r["compute_samples_per_s"] / bare["bare_samples_per_s"]
    device = torch.cuda.get_device_name() if a.device == "cuda" else f"cpu ({os.cpu_count()} cores, {a.threads} thread)"
    first = rows[0]
    result = {"bench": "pretrain_e2e", "device": device, "model": a.model, "precision": a.precision,
              "compile": a.compile, "decode_on": a.decode_on, "workers": a.workers, "stored_max_side": a.max_side,
              "steps": a.steps, "warmup": a.warmup,
              "samples_per_s": first.get("samples_per_s"), "bare_samples_per_s": bare.get("bare_samples_per_s"),
              "data_time_share": first.get("data_time_share"), "mfu": first.get("mfu"),
              "peak_mem_gib": first.get("peak_mem_gib"),
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20,
              "engine_vs_bare": first.get("engine_vs_bare"), **{k: v for k, v in bare.items()
                                                                 if k != "bare_samples_per_s"},
              "variants": rows, "torch": torch.__version__}
    print(json.dumps(result))
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
