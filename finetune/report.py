"""The demo report: results table, loss curves, a grid of predictions and the shard manifests.

Writes `<out>/report.md` with PNG files beside it. Inputs are the files the pipeline already wrote:
`results.json` (evaluate output per init and split), each run's `metrics.jsonl` (the engine's log) and the
shard manifests, plus per-expression prediction dumps for the pictures.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

RES_KEYS = ("miou", "oiou", "prec@0.5", "prec@0.7", "prec@0.9")


def read_metrics(path: str | Path) -> list[dict]:
    """The engine's metrics.jsonl (one JSON object per logged step); missing file -> []."""
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    return [r for r in rows if "step" in r and "loss" in r]


def results_table(results: dict) -> str:
    """Markdown table: one row per (init, split) with REC Prec@0.5 and the RES metrics."""
    head = "| init | split | n | REC Prec@0.5 | " + " | ".join(f"RES {k}" for k in RES_KEYS) + " |"
    lines = [head, "|" + "---|" * (4 + len(RES_KEYS))]
    for init, per_split in results.items():
        for split, r in per_split.items():
            res = r.get("res", {})
            cells = [init, split, str(r.get("n", "")), f"{r['rec']['prec@0.5']:.3f}"]
            cells += [f"{res[k]:.3f}" if k in res else "" for k in RES_KEYS]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kind_table(by_kind: dict) -> str:
    """Markdown table of {init: {split: {kind: {"n", "rec", "miou"}}}}: REC Prec@0.5 and mean mask IoU per
    expression kind (the synthetic expressions are attribute, superlative or relation ones)."""
    lines = ["| init | split | kind | n | REC Prec@0.5 | RES mIoU |", "|---|---|---|---|---|---|"]
    for init, per_split in by_kind.items():
        for split, per_kind in per_split.items():
            for kind in sorted(per_kind):
                r = per_kind[kind]
                lines.append(f"| {init} | {split} | {kind} | {r['n']} | {r['rec']:.3f} | {r['miou']:.3f} |")
    return "\n".join(lines)


def manifest_table(manifests: dict[str, dict]) -> str:
    """Markdown table of every shard set's manifest counts (samples, shards, skips by reason)."""
    lines = ["| shard set | samples | shards | captions | regions | refs | sentences | skipped (by reason) |",
             "|---|---|---|---|---|---|---|---|"]
    for name in sorted(manifests):
        m = manifests[name]
        counts = m.get("counts", m)
        skips = m.get("skipped", {}) or {}
        skip_text = ", ".join(f"{k}: {v}" for k, v in sorted(skips.items()) if v) or "none"
        cells = [name, str(m.get("samples", counts.get("samples", ""))), str(len(m.get("shards", [])))]
        cells += [str(counts.get(k, "")) for k in ("captions", "regions", "refs", "sentences")]
        lines.append("| " + " | ".join(cells + [skip_text]) + " |")
    return "\n".join(lines)


def smooth(values: Sequence[float], alpha: float = 0.3) -> list[float]:
    """Exponential moving average (logged losses are single-batch values, hence noisy)."""
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def plot_curves(runs: dict[str, Sequence[dict]], out_png: Path, title: str,
                keys: Iterable[str] = ("loss",)) -> bool:
    """One panel per key, one line per run (raw, faint, and smoothed); False when there is nothing to plot."""
    keys = list(keys)
    if not any(runs.values()):
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, rows in runs.items():
            pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
            if pts:
                xs, ys = zip(*pts)
                line, = ax.plot(xs, ys, linewidth=0.8, alpha=0.35)
                ax.plot(xs, smooth(ys), label=name, linewidth=1.6, color=line.get_color())
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return True


def _draw_box(ax, box_xywh, color, style="-"):
    x, y, w, h = box_xywh
    ax.add_patch(plt.Rectangle((x, y), w, h, fill=False, edgecolor=color, linewidth=2, linestyle=style))


def plot_predictions(examples: Sequence[dict], out_png: Path, cols: int = 4) -> bool:
    """Grid of examples: each {"image": HxWx3 uint8, "text", "gt_box", "pred_box" ([x,y,w,h] px),
    "gt_mask", "pred_mask" (HxW bool or None), "iou", "mask_iou"}. Green = ground truth, red = prediction."""
    if not examples:
        return False
    rows = (len(examples) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.5 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, ex in zip(axes.ravel(), examples):
        img = np.asarray(ex["image"]).astype(np.float32) / 255.0
        if ex.get("pred_mask") is not None:
            m = np.asarray(ex["pred_mask"], dtype=bool)
            img[m] = 0.55 * img[m] + 0.45 * np.array([1.0, 0.15, 0.15])
        ax.imshow(np.clip(img, 0, 1))
        if ex.get("gt_mask") is not None:
            ax.contour(np.asarray(ex["gt_mask"], dtype=float), levels=[0.5], colors=["lime"], linewidths=1)
        _draw_box(ax, ex["gt_box"], "lime", "--")
        _draw_box(ax, ex["pred_box"], "red")
        ok = "ok" if ex.get("iou", 0) >= 0.5 else "MISS"
        ax.set_title(f"{ex['text'][:38]}\nIoU {ex.get('iou', 0):.2f} / mask {ex.get('mask_iou', 0):.2f} [{ok}]",
                     fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return True


def write_report(out: Path, *, results: dict, manifests: dict[str, dict], curves: dict[str, dict[str, list]],
                 examples: Sequence[dict], timings: dict[str, float], notes: Sequence[str] = (),
                 by_kind: dict | None = None) -> Path:
    """Assemble report.md (+ PNGs) under `out`. `curves`: {stage title: {run name: metrics rows}};
    `by_kind`: the kind_table input (omitted when None or empty)."""
    out = Path(out)
    md = ["# Demo report", "",
          "Synthetic raw datasets in the real formats -> shards -> X-VLM pretraining -> VG-LAW fine-tuning "
          "(with Mask Grounding) from the pretraining checkpoint and from random initialisation, same steps "
          "-> evaluation on every non-train split.", "", "## Results", "", results_table(results), ""]
    md += [f"- {n}" for n in notes]
    if by_kind:
        md += ["", "### By expression kind", "", kind_table(by_kind)]
    md += ["", "## Loss curves", ""]
    for i, (title, runs) in enumerate(curves.items()):
        png = out / f"curves_{i}.png"
        keys = ["loss"] + sorted({k for rows in runs.values() for r in rows for k in r
                                  if k in ("itc", "itm", "mlm", "bbox", "giou", "l1", "focal", "dice", "mg")})[:3]
        if plot_curves(runs, png, title, keys):
            md += [f"### {title}", "", f"![{title}]({png.name})", ""]
    md += ["## Predictions", "",
           "Green dashed: ground-truth box and mask outline; red: predicted box and mask (threshold 0.35). "
           "The grid mixes successes and failures of the pretrained-init model on the test split.", ""]
    if plot_predictions(examples, out / "predictions.png"):
        md += ["![predictions](predictions.png)", ""]
    md += ["## Shard sets", "", manifest_table(manifests), "", "## Stage timings", "",
           "| stage | seconds |", "|---|---|"]
    md += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path
