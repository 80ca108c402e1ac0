"""Side-by-side figures from bench/gpu_issue14.sh's results.jsonl (one bench/pretrain_e2e.py result per run).

    python bench/summarize_issue14.py runs/gpu_issue14/results.jsonl

Prints a table (one row per run and engine variant) and, last, one JSON object: the rows, and the issue's
comparisons: engine vs bare per ZeRO stage and backend (eager and compiled), compiled vs eager, GPU vs CPU
decode (data_time share of the PyTorch engine), MFU before and after compiling, end-to-end samples/s/GPU and
the projected hours for 205M samples on 8 GPUs.
"""
from __future__ import annotations

import json
import sys

KEYS = ("samples_per_s", "compute_samples_per_s", "data_time_share", "mfu", "peak_mem_gib", "engine_vs_bare",
        "compute_vs_bare", "hours_205M_on_8", "compile/recompiles")


def rows_of(results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        res = r.get("result")
        if not res:
            rows.append({"run": r["run"], "error": r.get("error")})
            continue
        for v in res["variants"]:
            row = {"run": r["run"], "variant": v["variant"], "compile": res["compile"], "decode_on": res["decode_on"],
                   **{k: v.get(k) for k in KEYS}, "error": v.get("error")}
            row["bare_samples_per_s"] = res.get("bare_samples_per_s")
            row["bare_precision"] = res.get("bare_precision")
            rows.append(row)
    return rows


def pick(rows: list[dict], run: str, variant: str, key: str):
    return next((r.get(key) for r in rows if r["run"] == run and r.get("variant") == variant), None)


def main(path: str) -> dict:
    results = [json.loads(x) for x in open(path) if x.strip()]
    rows = rows_of(results)
    device = next((r["result"]["device"] for r in results if r.get("result")), None)
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    print(" | ".join(["run", "variant", *KEYS]))
    for r in rows:
        print(" | ".join([r["run"], str(r.get("variant")), *(fmt(r.get(k)) for k in KEYS)]))
    bare = {r["run"]: r["result"].get("bare_samples_per_s") for r in results if r.get("result")}
    summary = {
        "device": device, "rows": rows,
        "bare_eager_samples_per_s": bare.get("eager"), "bare_compiled_samples_per_s": bare.get("compiled"),
        "engine_vs_bare_eager": {r["variant"]: r["engine_vs_bare"] for r in rows if r["run"] == "eager" and "variant" in r},
        "engine_vs_bare_compiled": {r["variant"]: r["engine_vs_bare"] for r in rows
                                    if r["run"] == "compiled" and "variant" in r},
        "compiled_vs_eager": {v: pick(rows, "compiled", v, "samples_per_s") / pick(rows, "eager", v, "samples_per_s")
                              for v in ("deepspeed-zero0", "ddp")
                              if pick(rows, "eager", v, "samples_per_s") and pick(rows, "compiled", v, "samples_per_s")},
        "data_time_share_cpu_decode": pick(rows, "eager", "ddp", "data_time_share"),
        "data_time_share_gpu_decode": pick(rows, "decode_gpu", "ddp", "data_time_share"),
        "mfu_eager": {v: pick(rows, "eager", v, "mfu") for v in ("deepspeed-zero0", "deepspeed-zero2", "ddp")},
        "bare_mfu_note": "bare loops report samples/s only; their MFU = engine mfu x bare/engine samples/s",
        "mfu_compiled": {v: pick(rows, "compiled", v, "mfu") for v in ("deepspeed-zero0", "ddp")},
        "best_samples_per_s_gpu": max((r["samples_per_s"] for r in rows if r.get("samples_per_s")), default=None),
    }
    best = summary["best_samples_per_s_gpu"]
    summary["best_hours_205M_on_8"] = 205e6 / (8 * best) / 3600 if best else None
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1])
