"""Learning curves of the grounding model on the synthetic RefCOCO set: the instrument for model choices.

    python bench/learning.py                                   # configs/finetune/demo.yaml, 600 steps, 3 evals
    python bench/learning.py --steps 1200 --evals 4 model.window_size=0 --vs model.window_size=4
    python bench/learning.py --init runs/demo/pretrain --vs init_from=null      # pretrained vs scratch

Fine-tunes a config (plus dotted overrides) with the real `python -m finetune` command for a step budget,
evaluating every `steps / evals` steps on val, testA and testB, and prints the curve: REC Prec@0.5 and RES mIoU
per split and per expression kind (attribute / superlative / relation, parsed back from the text), samples/s
and wall time, beside the language-blind references computed from the annotations (finetune.references).

`--dataset grefcoco` runs on the synthetic gRefCOCO set instead (expressions naming several shapes or none, see
shards.synthetic) and prints gRefCOCO's metrics (gIoU, cIoU, N-acc, T-acc, Prec@(F1=1, IoU>=0.5)) beside REC
(one-target expressions) and mIoU, e.g. the multi-instance head against the one-instance one:

    python bench/learning.py --dataset grefcoco model.head=mdetr loss.context=0 data.context_refs=0 --vs model.head=vglaw

`--vs OVERRIDES...` runs a second setting (the same config, the common overrides, then these) at the same time,
one process each with `--threads` threads (default 1 each), on the same data and seed, so two choices are
compared on one machine state. The synthetic data is drawn once per (seed, images) under `--out`/data (or give
`--data DIR`, a `shards demo` output). The last line of output is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SPLITS = ("val", "testA", "testB")


def build_data(out: Path, seed: int, images: int, dataset: str = "refcoco") -> Path:
    """Synthetic raw data + the refcoco shard set (+ the grefcoco one) + a tokenizer over them under `out` (kept
    between runs)."""
    from shards.__main__ import build_parser, run
    from shards.demo import build_demo_tokenizer, demo_commands
    from shards.synthetic import generate

    if (out / "tokenizer" / "vocab.txt").is_file():
        return out
    generate(out / "raw", seed=seed, images=images)
    refcoco = [c for c in demo_commands(out / "raw", out / "shards", 2) if c[0] == "refcoco"]
    if dataset == "grefcoco":           # the same command on the same refer images, the gRefCOCO refs file
        argv = list(refcoco[0])
        argv[argv.index("--dataset") + 1] = "grefcoco"
        argv[argv.index("--out") + 1] = str(out / "shards" / "grefcoco")
        refcoco.append(argv)
    for argv in refcoco:
        run(build_parser().parse_args(argv))
    build_demo_tokenizer(out)
    return out


def resolve_data(args: argparse.Namespace, dataset: str = "refcoco") -> Path:
    """--data, checked, or the synthetic set drawn once under --out/data (--data-seed, --images)."""
    from shards.inputs import InputError

    suffix = "" if dataset == "refcoco" else f"-{dataset}"      # its own tokenizer covers its words
    data = args.data or build_data(args.out / "data" / f"seed{args.data_seed}-images{args.images}{suffix}",
                                   args.data_seed, args.images, dataset)
    for part in ("raw/refer", f"shards/{dataset}", "tokenizer"):
        if not (data / part).is_dir():
            raise InputError(data, f"no {part}/ here: --data takes a `python -m shards demo` output folder"
                             + (" (with shards/grefcoco for --dataset grefcoco)" if dataset != "refcoco" else ""))
    return data


def finetune_cmd(args: argparse.Namespace, data: Path, run_dir: Path, overrides: list[str]) -> list[str]:
    every = max(1, args.steps // args.evals)
    cmd = [sys.executable, "-m", "finetune", "--config", args.config, f"run.out_dir={run_dir}",
           f"data.shards={data / 'shards' / args.dataset}", f"optim.total_steps={args.steps}",
           f"run.eval_every={every}", f"run.save_every={args.steps}", "run.resume=null", f"run.seed={args.seed}",
           "eval.dump=true", f"eval.splits=[{', '.join(SPLITS)}]", f"init_from={args.init}",
           f"model.text.tokenizer={data / 'tokenizer'}"]
    return cmd + list(args.overrides) + overrides


def clear_run_dir(run_dir: Path) -> None:
    """Every curve is a fresh run: remove an earlier run of this bench in `run_dir` (a folder holding the
    finetune run's config.yaml or metrics.jsonl); refuse any other non-empty folder."""
    import shutil

    if not run_dir.exists():
        return
    if not run_dir.is_dir() or (any(run_dir.iterdir()) and not ((run_dir / "config.yaml").is_file()
                                                               or (run_dir / "metrics.jsonl").is_file()
                                                               or (run_dir / "log.txt").is_file())):
        raise SystemExit(f"error: {run_dir}: exists and is not a run of this benchmark; choose another --out")
    shutil.rmtree(run_dir)


def launch(cmd: list[str], threads: int, log: Path, port: int) -> tuple[subprocess.Popen, float]:
    from finetune.demo import stage_env

    env = dict(stage_env(threads), TOKENIZERS_PARALLELISM="false", MASTER_PORT=str(port))   # own group port
    log.parent.mkdir(parents=True, exist_ok=True)
    f = open(log, "w")
    f.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
    f.flush()
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT), time.perf_counter()


def read_curve(run_dir: Path, total: int, targets: dict[str, dict] | None = None) -> list[dict]:
    """Evaluation points from metrics.jsonl and the per-expression dumps: one dict per evaluated step. With
    `targets` ({split: finetune.references.ref_targets}) each point also gets the distinct-answer rate."""
    from finetune.demo import attribute_cue, kind_breakdown
    from finetune.references import pooled_distinct_answers

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    samples = 0
    points = []
    for r in rows:
        if "step_time" in r:
            samples = int(r.get("samples_seen", samples))
        if not any(k.startswith("eval/") for k in r):
            continue
        step = int(r["step"])
        sub = "" if step >= total else f"step{step:06d}"
        p = {"step": step, "samples": samples, "splits": {}, "kinds": {}, "cues": {}}
        dumps = []
        for s in SPLITS:
            if f"eval/{s}/rec_prec@0.5" in r:          # finetune.__main__.flat_metrics' keys
                p["splits"][s] = {"rec": r[f"eval/{s}/rec_prec@0.5"], "miou": r.get(f"eval/{s}/miou")}
                dump = run_dir / "eval" / sub / f"{s}.jsonl"
                gen = {k[len(f"eval/{s}/grefcoco_"):]: v for k, v in r.items() if k.startswith(f"eval/{s}/grefcoco_")}
                if gen:
                    p["splits"][s]["grefcoco"] = gen
                    continue
                p["kinds"][s] = kind_breakdown(dump)
                p["cues"][s] = kind_breakdown(dump, attribute_cue)
                if targets:
                    dumps.append((dump, targets[s]))
        p["distinct_answers"] = pooled_distinct_answers(dumps)["rate"]
        points.append(p)
    speeds = [r["samples_per_s_gpu"] for r in rows if "samples_per_s_gpu" in r]
    for p in points:
        p["samples_per_s"] = sum(speeds) / len(speeds) if speeds else None
    return points


def mean_over_splits(p: dict, key: str) -> float:
    vals = [v[key] for v in p["splits"].values() if v.get(key) is not None]
    return sum(vals) / len(vals) if vals else float("nan")


def kinds_pooled(p: dict, field: str = "kinds") -> dict[str, dict]:
    """Per expression kind (or attribute cue, field="cues") over all evaluated splits (weighted by the number of
    expressions)."""
    out: dict[str, dict] = {}
    for per_split in p.get(field, {}).values():
        for k, v in per_split.items():
            o = out.setdefault(k, {"n": 0, "rec": 0.0, "miou": 0.0})
            o["n"] += v["n"]
            o["rec"] += v["rec"] * v["n"]
            o["miou"] += v["miou"] * v["n"]
    return {k: {"n": v["n"], "rec": v["rec"] / v["n"], "miou": v["miou"] / v["n"]} for k, v in sorted(out.items())}


def print_table(name: str, points: list[dict], wall: float) -> None:
    print(f"\n## {name}  (wall {wall / 60:.1f} min)")
    head = "| step | samples | " + " | ".join(f"{s} P@0.5 / mIoU" for s in SPLITS) + \
        " | attribute | superlative | relation | distinct answers | samples/s |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for p in points:
        cells = [f"{p['step']}", f"{p['samples']}"]
        for s in SPLITS:
            v = p["splits"].get(s)
            cells.append(f"{v['rec']:.3f} / {v['miou']:.3f}" if v else "-")
        kinds = kinds_pooled(p)
        for k in ("attribute", "superlative", "relation"):
            v = kinds.get(k)
            cells.append(f"{v['rec']:.3f} / {v['miou']:.3f}" if v else "-")
        cells.append(f"{p['distinct_answers']:.2f}" if p.get("distinct_answers") is not None else "-")
        cells.append(f"{p['samples_per_s']:.1f}" if p.get("samples_per_s") else "-")
        print("| " + " | ".join(cells) + " |")


CUES = ("colour", "shape", "colour+shape", "size")


def print_cue_table(name: str, points: list[dict], refs: dict[str, dict]) -> None:
    """Attribute expressions by what they name the target by (finetune.demo.attribute_cue), all splits pooled,
    beside the random-object reference of the same expressions: which visual property the model has learnt."""
    if not any(p.get("cues") for p in points):
        return
    print(f"\n## {name}: attribute expressions by the cue they name (Prec@0.5 / mIoU, all splits)")
    print("| step | " + " | ".join(CUES) + " |")
    print("|" + "---|" * (len(CUES) + 1))
    for p in points:
        cues = kinds_pooled(p, "cues")
        print(f"| {p['step']} | " + " | ".join(f"{cues[c]['rec']:.3f} / {cues[c]['miou']:.3f}" if c in cues else "-"
                                               for c in CUES) + " |")
    if refs:
        cells = []
        for c in CUES:
            per = [(r["cues"][c]["n"], r["cues"][c]["random_object"]["rec"]) for r in refs.values()
                   if c in r.get("cues", {})]
            n = sum(k for k, _ in per)
            cells.append(f"{sum(k * v for k, v in per) / n:.3f} (n {n})" if n else "-")
        print("| random object | " + " | ".join(cells) + " |")


GREFCOCO_COLUMNS = (("giou", "gIoU"), ("ciou", "cIoU"), ("n_acc", "N-acc"), ("t_acc", "T-acc"),
                    ("prec@f1=1,iou>=0.5", "F1=1@0.5"))


def print_grefcoco_table(name: str, points: list[dict]) -> None:
    """gRefCOCO's metrics per evaluation point and split (runs on --dataset grefcoco)."""
    if not any("grefcoco" in v for p in points for v in p["splits"].values()):
        return
    print(f"\n## {name}: gRefCOCO metrics (" + ", ".join(h for _, h in GREFCOCO_COLUMNS) + ")")
    print("| step | " + " | ".join(SPLITS) + " |")
    print("|" + "---|" * (len(SPLITS) + 1))
    for p in points:
        cells = [str(p["step"])]
        for s in SPLITS:
            g = p["splits"].get(s, {}).get("grefcoco")
            cells.append(" / ".join("-" if g.get(k) is None else f"{g[k]:.3f}" for k, _ in GREFCOCO_COLUMNS)
                         if g else "-")
        print("| " + " | ".join(cells) + " |")


def print_references(refs: dict[str, dict]) -> None:
    print("\n## Language-blind references (from the annotations; Prec@0.5 / mIoU)")
    print("| split | n | random object | largest object | all objects |")
    print("|---|---|---|---|---|")
    for s, r in refs.items():
        cells = [f"{r[k]['rec']:.3f} / {r[k]['miou']:.3f}" for k in ("random_object", "largest_object", "all_objects")]
        print(f"| {s} | {r['n']} | " + " | ".join(cells) + " |")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/finetune/demo.yaml")
    ap.add_argument("--data", type=Path, default=None, help="a `shards demo` output dir (raw/, shards/refcoco, tokenizer/)")
    ap.add_argument("--dataset", choices=("refcoco", "grefcoco"), default="refcoco",
                    help="grefcoco: the synthetic multi-target / no-target splits (gRefCOCO metrics printed)")
    ap.add_argument("--images", type=int, default=1280, help="synthetic COCO images when drawing data (default 1280)")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data drawn")
    ap.add_argument("--seed", type=int, default=0, help="training seed (run.seed)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--evals", type=int, default=3, help="evaluation points (every steps/evals steps)")
    ap.add_argument("--init", default="null", help="init_from: a pretraining run dir, or null (scratch)")
    ap.add_argument("--threads", type=int, default=None, help="threads per run (default: 1 with --vs, else all)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "learning")
    ap.add_argument("--name", default="a", help="label of the first setting")
    ap.add_argument("--vs-name", default="b", help="label of the --vs setting")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides for both settings")
    ap.add_argument("--vs", nargs="+", default=None, metavar="KEY=VALUE",
                    help="a second setting: these overrides on top of the common ones, run side by side")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from shards.inputs import InputError

    try:
        return run(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:                        # an --out that cannot be written
        print(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    from finetune.demo import attribute_cue
    from finetune.references import language_blind_references, ref_targets
    from shards.synthetic_text import parse

    data = resolve_data(args, args.dataset)
    refs = ({s: language_blind_references(data / "raw" / "refer", s, by_kind=lambda t: parse(t).kind,
                                          groupings={"cues": attribute_cue}) for s in SPLITS}
            if args.dataset == "refcoco" else {})
    targets = {s: ref_targets(data / "raw" / "refer", s) for s in SPLITS} if args.dataset == "refcoco" else None
    settings = [(args.name, [])] + ([(args.vs_name, list(args.vs))] if args.vs else [])
    threads = args.threads or (1 if args.vs else (os.cpu_count() or 1))
    from pretrain.distributed import free_ports

    procs = []
    for (name, extra), port in zip(settings, free_ports(len(settings))):
        run_dir = args.out / name
        clear_run_dir(run_dir)
        proc, t0 = launch(finetune_cmd(args, data, run_dir, extra), threads, run_dir / "log.txt", port)
        procs.append((name, extra, run_dir, proc, t0))
        print(f"[learning] {name}: {' '.join(args.overrides + extra) or '(config as is)'} -> {run_dir}/log.txt",
              flush=True)
    result = {"config": args.config, "dataset": args.dataset, "steps": args.steps, "threads_per_run": threads, "data": str(data),
              "seed": args.seed, "references": refs, "runs": {}}
    failed = False
    for name, extra, run_dir, proc, t0 in procs:
        rc = proc.wait()
        wall = time.perf_counter() - t0
        if rc != 0:
            print(f"error: run {name} failed with exit code {rc}; log: {run_dir / 'log.txt'}", file=sys.stderr)
            failed = True
            continue
        points = read_curve(run_dir, args.steps, targets)
        print_table(f"{name}: {' '.join(args.overrides + extra) or '(config as is)'}", points, wall)
        print_cue_table(name, points, refs)
        print_grefcoco_table(name, points)
        last = points[-1] if points else None
        result["runs"][name] = {"overrides": args.overrides + extra, "wall_s": wall, "curve": points,
                                "final": None if last is None else {
                                    "rec_mean": mean_over_splits(last, "rec"), "miou_mean": mean_over_splits(last, "miou"),
                                    "splits": last["splits"], "kinds": kinds_pooled(last),
                                    "cues": kinds_pooled(last, "cues")}}
    if refs:
        print_references(refs)
    print(json.dumps(result))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
