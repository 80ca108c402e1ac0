"""Evaluate a fine-tuned VG-LAW checkpoint or a predictions file on RefCOCO-family shards.

    python -m finetune.evaluate --checkpoint runs/refcoco/export --data shards/refcoco --split val testA testB
    python -m finetune.evaluate --predictions preds.jsonl --data shards/refcoco --split val

Predictions are mapped back through the letterbox and scored at the original image size (see
finetune.metrics for the conventions). Under torchrun/srun every rank scores its exact share of the split's
expressions (shards.index's ExactDistributedSampler: no padding, no duplicates) and the per-expression records
are gathered once at the end and keyed by dataset index, so the result is identical for any number of ranks.
Output per split, the DESIGN.md format: {"split", "n", "rec": {"prec@0.5"}, "res": {"miou", "oiou", "prec@0.5"...}};
a split whose expressions may name several targets or none (gRefCOCO) adds "grefcoco": {gIoU, cIoU, N-acc,
T-acc, Prec@(F1=1, IoU>=0.5), ...} (finetune.grefcoco_metrics), and the multi-instance head's answers
(finetune.answers) carry several boxes and masks into dumps and predictions files.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from finetune.answers import merged_gt_mask, one_box_answer, query_answer, score_answer
from finetune.grefcoco_metrics import generalised_record
from finetune.metrics import box_iou_xywh, expression_record, format_table, summarize
from finetune.model import VGLaw
from shards.masks import decode_mask, encode_mask

DEFAULT_THRESHOLD = 0.35


# ---------------------------------------------------------------------------------------------- helpers
def _model_of(task_or_model: nn.Module) -> VGLaw:
    model = getattr(task_or_model, "module", task_or_model)     # DeepSpeed / DDP wrappers
    model = getattr(model, "model", model)                      # GroundingTask -> VGLaw
    if not isinstance(model, VGLaw):
        raise TypeError(f"expected a VGLaw model or a GroundingTask, got {type(model).__name__}")
    return model


def split_dir(data: str | Path, split: str) -> Path:
    """`data/<split>` (a dataset dir with one folder per split) or `data` itself when it is that split."""
    p = Path(data)
    if (p / split / "manifest.json").is_file():
        return p / split
    if (p / "manifest.json").is_file() and p.name == split:
        return p
    raise FileNotFoundError(f"{p}: no shards for split '{split}' (expected {p / split}/manifest.json)")


def gather_records(records: list[dict], world_size: int) -> list[dict]:
    """All ranks' records, keyed by dataset index (duplicates dropped), sorted by index."""
    if world_size > 1:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("world_size > 1 needs an initialised torch.distributed process group")
        parts: list[Any] = [None] * world_size
        dist.all_gather_object(parts, records)
        records = [r for part in parts for r in part]
    return merge_records([records])


def merge_records(parts: Iterable[list[dict]]) -> list[dict]:
    by_index: dict[int, dict] = {}
    for part in parts:
        for r in part:
            by_index.setdefault(int(r["index"]), r)
    return [by_index[i] for i in sorted(by_index)]


# ---------------------------------------------------------------------------------------------- model scoring
@torch.no_grad()
def score_split(model: VGLaw, dataset: Any, *, batch_size: int, device: torch.device | str, rank: int = 0,
                world_size: int = 1, threshold: float = DEFAULT_THRESHOLD, keep_predictions: bool = False,
                num_workers: int = 0) -> list[dict]:
    """This rank's records: the model on its exact share of `dataset` (shards.index's ExactDistributedSampler:
    indices rank, rank + W, ...), one record per expression (scores, and predictions on request)."""
    from shards.index import build_grounding_loader

    device = torch.device(device)
    was_training = model.training
    model.eval()
    loader = build_grounding_loader(dataset, train=False, batch_size=batch_size, num_workers=num_workers,
                                    rank=rank, world_size=world_size, epoch=0, seed=0)
    dtype = next(model.parameters()).dtype
    records: list[dict] = []
    try:
        for batch in loader:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = model.predict(batch["image"].to(device, dtype), batch["text_ids"].to(device),
                                    batch["text_mask"].to(device))
            size = tuple(batch["image"].shape[-2:])
            for j in range(len(batch["index"])):
                idx = int(batch["index"][j])
                scale, offset = float(batch["scale"][j]), [float(v) for v in batch["offset"][j]]
                gt = dataset.target(idx)
                if model.multi:
                    ans = query_answer(out["boxes"][j], out["scores"][j], out["mask_logits"][j], size, scale, offset,
                                       gt["size"], model.score_threshold, threshold)
                else:
                    ans = one_box_answer(out["boxes"][j], out["mask_probs"][j], size, scale, offset, gt["size"],
                                         threshold)
                rec = {"index": idx, "ref_id": _int(gt.get("ref_id")), "sentence": int(gt["sentence"]),
                       **score_answer(ans, gt)}
                if keep_predictions:
                    rec.update(prediction_fields(ans, gt, multi=model.multi), text=gt.get("text", ""))
                records.append(rec)
    finally:
        model.train(was_training)
    return records


def prediction_fields(ans: dict, gt: dict, *, multi: bool) -> dict:
    """The predictions-file fields of an answer: bbox and mask (the top query's on a one-target ref, the merged
    mask on a generalised one), and with several answers possible (the mdetr head, or a generalised ref)
    bboxes, scores, masks (one RLE per box) and no_target."""
    generalised = bool(gt.get("generalised"))
    out = {"bbox": ans["top_box"], "mask": encode_mask(ans["mask"] if generalised else ans["top_mask"])}
    if multi or generalised:
        out.update(bboxes=ans["bboxes"], scores=ans["scores"], masks=[encode_mask(m) for m in ans["masks"]],
                   no_target=ans["none"])
    return out


def _int(v: Any) -> int:
    return -1 if v is None else int(v)


def evaluate_model(task_or_model: nn.Module, shard_dir: str | Path, tokenizer: Any, *, batch_size: int,
                   device: torch.device | str, rank: int = 0, world_size: int = 1, image_size: int | None = None,
                   max_len: int = 40, threshold: float | None = None, dump: str | Path | None = None,
                   num_workers: int = 0) -> dict:
    """Score a model on one split's shard dir; every rank calls it and every rank gets the full result.

    Returns {"split", "n", "rec": {...}, "res": {...}}; with `dump`, rank 0 writes one JSON line per expression
    (index, ref_id, sentence, text, bbox, mask, box_iou, mask_iou) for error analysis.
    """
    from shards.index import GroundingDataset

    model = _model_of(task_or_model)
    size = image_size or model.vision.vit.patch_embed.img_size[0]
    dataset = GroundingDataset(str(shard_dir), tokenizer, train=False, image_size=size, max_len=max_len)
    thr = model.mask_threshold if threshold is None else threshold
    records = score_split(model, dataset, batch_size=batch_size, device=device, rank=rank, world_size=world_size,
                          threshold=thr, keep_predictions=dump is not None, num_workers=num_workers)
    records = gather_records(records, world_size)
    if dump is not None and rank == 0:
        write_jsonl(dump, records)
    return {"split": Path(shard_dir).name, **summarize(records)}


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    with tmp.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    tmp.replace(p)


# ---------------------------------------------------------------------------------------------- predictions file
def read_predictions(path: str | Path) -> tuple[dict[tuple[int, int], dict], dict[str, int]]:
    """preds.jsonl -> {(ref_id, sentence): prediction}; malformed lines and duplicates are skipped and counted."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: predictions file not found")
    preds: dict[tuple[int, int], dict] = {}
    skipped = {"malformed": 0, "duplicate": 0}
    for line in p.read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
            ref_id, sent = obj["ref_id"], obj.get("sentence", 0)
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (ref_id, sent)):
                raise TypeError("ref_id and sentence must be integers")
            key = (ref_id, sent)
            pred = {"mask": obj.get("mask")}
            if "bboxes" in obj:             # several answers (or none): bboxes [, masks, scores, no_target]
                if not isinstance(obj["bboxes"], list):
                    raise TypeError("bboxes must be a list")
                pred["bboxes"] = [_pred_box(b) for b in obj["bboxes"]]
                if not isinstance(obj.get("masks", []), list) or not isinstance(obj.get("no_target", False), bool):
                    raise TypeError("masks must be a list and no_target a bool")
                pred.update(masks=obj.get("masks"), no_target=obj.get("no_target", not pred["bboxes"]))
            if "bbox" in obj or "bboxes" not in obj:
                pred["bbox"] = _pred_box(obj["bbox"])
            else:
                pred["bbox"] = pred["bboxes"][0] if pred["bboxes"] else [0.0, 0.0, 0.0, 0.0]
        except (ValueError, KeyError, TypeError, AttributeError):   # UnicodeDecodeError is a ValueError
            skipped["malformed"] += 1
            continue
        if key in preds:
            skipped["duplicate"] += 1
            continue
        preds[key] = pred
    return preds, skipped


def _pred_box(b: Any) -> list[float]:
    if not isinstance(b, list) or len(b) != 4 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in b):
        raise ValueError("bbox")
    box = [float(v) for v in b]
    if not all(math.isfinite(v) for v in box) or box[2] < 0 or box[3] < 0:
        raise ValueError("bbox not finite or negative size")
    return box


def _pred_mask(rles: list, shape: tuple[int, int], skipped: dict) -> np.ndarray:
    """The union of a prediction's RLE masks at the ground truth's size (an undecodable or wrongly sized one is
    counted and left out)."""
    out = np.zeros(shape, dtype=bool)
    for rle in rles:
        if not rle:
            continue
        try:
            m = decode_mask(rle)
        except Exception:  # noqa: BLE001 - an undecodable RLE is one bad prediction, not a crash
            skipped["malformed"] += 1
            continue
        if m.shape != shape:
            skipped["mask_size"] = skipped.get("mask_size", 0) + 1
            continue
        out |= m.astype(bool)
    return out


def _generalised_prediction_record(pred: dict | None, gt: dict, skipped: dict) -> dict:
    """A generalised ref scored from the predictions file; a missing prediction is wrong on every count."""
    gt_mask = merged_gt_mask(gt)
    if pred is None:
        rec = {"gt_none": gt["no_target"], "pred_none": not gt["no_target"], "n_gt": len(gt["bboxes"]),
               "n_pred": int(gt["no_target"]), "tp": 0}
        if gt_mask is not None:
            rec.update(inter=0, union=int(gt_mask.sum()), mask_iou=0.0)
        if len(gt["bboxes"]) == 1:
            rec["box_iou"] = 0.0
        return rec
    boxes = pred.get("bboxes", [pred["bbox"]])
    pmask = None
    if gt_mask is not None:
        pmask = _pred_mask(pred.get("masks") or [pred.get("mask")], gt_mask.shape, skipped)
    rec = generalised_record(boxes, gt["bboxes"], pred.get("no_target", not boxes), pmask, gt_mask)
    if len(gt["bboxes"]) == 1:
        rec["box_iou"] = box_iou_xywh(pred["bbox"], gt["bboxes"][0])
    return rec


def evaluate_predictions(preds_path: str | Path, shard_dir: str | Path, *, dump: str | Path | None = None) -> dict:
    """Score a predictions file against one split's ground truth (a missing expression scores IoU 0). Lines
    may carry several answers (bboxes, masks, no_target: what `--dump` and finetune.predict write); a
    generalised split (several targets or none) is scored with them, a one-target split with bbox and mask."""
    from shards.index import GroundingDataset

    preds, skipped = read_predictions(preds_path)
    dataset = GroundingDataset(str(shard_dir), None, train=False)
    records, seen = [], set()
    missing = 0
    for i in range(len(dataset)):
        gt = dataset.target(i)
        key = (_int(gt.get("ref_id")), int(gt["sentence"]))
        seen.add(key)
        pred = preds.get(key)
        if gt.get("generalised"):
            missing += pred is None
            records.append({"index": i, "ref_id": key[0], "sentence": key[1],
                            **_generalised_prediction_record(pred, gt, skipped)})
            continue
        gt_mask = decode_mask(gt["mask"]) if gt.get("mask") else None
        if pred is None:
            missing += 1
            rec = {"box_iou": 0.0}
            if gt_mask is not None:
                union = int(gt_mask.sum())
                rec.update(inter=0, union=union, mask_iou=0.0 if union else 1.0)
        else:
            pmask = None
            if gt_mask is not None:
                try:
                    pmask = decode_mask(pred["mask"]) if pred.get("mask") else np.zeros_like(gt_mask)
                except Exception:  # noqa: BLE001 - an undecodable RLE is one bad prediction, not a crash
                    skipped["malformed"] += 1
                    pmask = np.zeros_like(gt_mask)
                if pmask.shape != gt_mask.shape:
                    skipped["mask_size"] = skipped.get("mask_size", 0) + 1
                    pmask = np.zeros_like(gt_mask)
            rec = expression_record(pred["bbox"], gt["bbox"], pmask, gt_mask)
        records.append({"index": i, "ref_id": key[0], "sentence": key[1], **rec})
    if dump is not None:
        write_jsonl(dump, records)
    extra = sum(1 for k in preds if k not in seen)
    return {"split": Path(shard_dir).name, **summarize(records),
            "predictions": {"missing": missing, "unmatched": extra, **skipped}}


# ---------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m finetune.evaluate", description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="fine-tuning export dir / run dir / model.safetensors / DeepSpeed dir")
    src.add_argument("--predictions", help="predictions JSONL in original-image pixels (DESIGN.md)")
    ap.add_argument("--data", required=True, help="dataset shard dir holding <split>/manifest.json")
    ap.add_argument("--split", nargs="+", default=["val"], help="one or more splits (default: val)")
    ap.add_argument("--out", help="write the JSON result here (one split: its result; several: {split: result})")
    ap.add_argument("--dump", help="write per-expression records to DIR/<split>.jsonl")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threshold", type=float, help="mask probability threshold (default: the model's, 0.35)")
    ap.add_argument("--workers", type=int, default=2)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pretrain.config import ConfigError
    from shards.inputs import InputError, writable_dir, write_text_file
    from shards.stream import DataError

    try:
        if args.dump:
            writable_dir(args.dump, "--dump folder")
        if args.out:
            writable_dir(Path(args.out).parent, "folder of --out")
        dirs = {s: split_dir(args.data, s) for s in args.split}
        results: dict[str, dict] = {}
        if args.predictions:
            for s, d in dirs.items():
                dump = Path(args.dump) / f"{s}.jsonl" if args.dump else None
                results[s] = evaluate_predictions(args.predictions, d, dump=dump)
            rank = 0
        else:
            results, rank = _evaluate_checkpoint(args, dirs)
    except (FileNotFoundError, ConfigError, DataError, ValueError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        print(format_table(results))
        out = results[args.split[0]] if len(results) == 1 else results
        text = json.dumps(out, indent=2)
        if args.out:
            try:
                write_text_file(args.out, text + "\n")
            except InputError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        print(json.dumps(out))
    return 0


def _evaluate_checkpoint(args: argparse.Namespace, dirs: dict[str, Path]) -> tuple[dict[str, dict], int]:
    from finetune.checkpoint import load_finetuned
    from pretrain import distributed as du

    model, cfg, tokenizer = load_finetuned(args.checkpoint)
    world = 1
    rank = 0
    device = torch.device(args.device)
    if du.discover().world_size > 1:
        info, device = du.init_distributed()
        rank, world = info.rank, info.world_size
    model.to(device)
    results = {}
    for s, d in dirs.items():
        dump = Path(args.dump) / f"{s}.jsonl" if args.dump else None
        results[s] = evaluate_model(model, d, tokenizer, batch_size=args.batch_size, device=device, rank=rank,
                                    world_size=world, image_size=cfg.data.image_size, max_len=cfg.data.max_len,
                                    threshold=args.threshold, dump=dump, num_workers=args.workers)
    return results, rank


if __name__ == "__main__":
    sys.exit(main())
