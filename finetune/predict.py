"""Draw what a fine-tuned VG-LAW model grounds: box, mask overlay and the expression, on the original image.

    python -m finetune.predict --checkpoint runs/refcoco/export --image img.jpg --text "the man on the left" --out out.png
    python -m finetune.predict --checkpoint runs/refcoco/export --pairs pairs.jsonl --out-dir preds/

A pairs file holds one {"image": path, "text": expression} per line; each pair becomes DIR/<i>_<image stem>.png
and a line of DIR/predictions.jsonl ({"image", "text", "bbox": [x, y, w, h], "mask": COCO RLE} in original
pixels). A model with the multi-instance head (model.head: mdetr) answers with every query above its score
threshold: the lines add "bboxes", "scores", "masks" (one RLE per box) and "no_target", "mask" is their merged
mask and "bbox" the top-scoring query's box; the picture shows every kept box (none for "no target"). Unreadable lines or images are skipped and counted. Preprocessing is exactly the evaluation
letterbox of shards.index (longer side to the model's size, centred, CLIP normalisation).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from shards.masks import encode_mask
from finetune.answers import query_answer
from finetune.metrics import unletterbox_box, unletterbox_mask
from finetune.model import VGLaw

BOX_COLOUR = (255, 40, 40)
MASK_COLOUR = (30, 144, 255)
MASK_ALPHA = 0.45


def prepare_input(image: torch.Tensor, text: str, tokenizer: Any, *, image_size: int, max_len: int) -> dict:
    """uint8 [3,H,W] image + expression -> a one-item grounding batch (as GroundingDataset builds it in eval)."""
    from shards.augment import CLIP_MEAN, CLIP_STD, grounding_view, normalize
    from shards.text import clean_caption

    h, w = image.shape[-2:]
    text = clean_caption(text, 1000)
    v = grounding_view(image, [0.0, 0.0, float(w), float(h)], torch.zeros(h, w, dtype=torch.uint8), text,
                       train=False, size=image_size)
    enc = tokenizer(v["text"], padding="max_length", truncation=True, max_length=max_len, return_attention_mask=True)
    return {"image": normalize(v["image"], CLIP_MEAN, CLIP_STD)[None],
            "text_ids": torch.tensor([enc["input_ids"]], dtype=torch.long),
            "text_mask": torch.tensor([enc["attention_mask"]], dtype=torch.long),
            "scale": v["scale"], "offset": v["offset"], "orig_size": (h, w)}


@torch.no_grad()
def predict_image(model: VGLaw, image: torch.Tensor, text: str, tokenizer: Any, *, image_size: int, max_len: int,
                  device: torch.device | str = "cpu", threshold: float | None = None) -> dict:
    """-> {"bbox": [x, y, w, h], "mask": bool [H, W]} in the image's pixels; the multi-instance head adds
    "bboxes", "scores", "masks" and "no_target" (finetune.answers.query_answer)."""
    device = torch.device(device)
    b = prepare_input(image, text, tokenizer, image_size=image_size, max_len=max_len)
    model.eval()
    dtype = next(model.parameters()).dtype
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = model.predict(b["image"].to(device, dtype), b["text_ids"].to(device), b["text_mask"].to(device))
    thr = model.mask_threshold if threshold is None else threshold
    if model.multi:
        ans = query_answer(out["boxes"][0], out["scores"][0], out["mask_logits"][0], (image_size, image_size),
                           b["scale"], b["offset"], b["orig_size"], model.score_threshold, thr)
        return {"bbox": ans["top_box"], "mask": ans["mask"], "bboxes": ans["bboxes"], "scores": ans["scores"],
                "masks": ans["masks"], "no_target": ans["none"]}
    box = unletterbox_box(out["boxes"][0].cpu(), image_size, b["scale"], b["offset"], b["orig_size"])
    mask = unletterbox_mask(out["mask_probs"][0], b["scale"], b["offset"], b["orig_size"], thr)
    return {"bbox": box, "mask": mask}


def draw_prediction(image: Image.Image, bbox: list[float], mask: np.ndarray, text: str,
                    boxes: list[list[float]] | None = None) -> Image.Image:
    """The image with the mask blended in, the box outlined (every box of `boxes` when given, none when it is
    empty) and the expression written in its top-left corner."""
    img = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    colour = np.array(MASK_COLOUR, dtype=np.float32)
    img[mask] = (1 - MASK_ALPHA) * img[mask] + MASK_ALPHA * colour
    out = Image.fromarray(img.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    tx0, ty0, tx1, ty1 = draw.textbbox((4, 2), text, font=font)
    draw.rectangle([tx0 - 3, ty0 - 2, tx1 + 3, ty1 + 2], fill=(0, 0, 0))
    draw.text((4, 2), text, fill=(255, 255, 255), font=font)
    W, H = out.size
    width = max(1, round(min(W, H) / 200))
    for x, y, w, h in ([bbox] if boxes is None else boxes):
        x0, y0 = min(max(round(x), 0), W - 1), min(max(round(y), 0), H - 1)
        x1, y1 = min(max(round(x + w) - 1, x0), W - 1), min(max(round(y + h) - 1, y0), H - 1)
        draw.rectangle([x0, y0, x1, y1], outline=BOX_COLOUR, width=width)
    return out


def read_image(path: str | Path) -> torch.Tensor:
    from shards.decode import decode_image

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: image not found")
    return decode_image(p.read_bytes())


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def read_pairs(path: str | Path) -> tuple[list[tuple[str, str]], int]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: pairs file not found")
    pairs, bad = [], 0
    for line in p.read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
            if not isinstance(obj["image"], str) or not isinstance(obj["text"], str):
                raise TypeError("image and text must be strings")
            pairs.append((obj["image"], obj["text"]))
        except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
            bad += 1
    return pairs, bad


def _caption(text: str, pred: dict) -> str:
    return text + " (no target)" if pred.get("no_target") else text


def _multi_fields(pred: dict, with_masks: bool) -> dict:
    """The multi-instance head's extra predictions-file fields (none for the one-instance head)."""
    if "bboxes" not in pred:
        return {}
    out = {"bboxes": pred["bboxes"], "scores": pred["scores"], "no_target": pred["no_target"]}
    if with_masks:
        out["masks"] = [encode_mask(m) for m in pred["masks"]]
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m finetune.predict", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="fine-tuning export dir / run dir / model.safetensors")
    ap.add_argument("--image", help="one image")
    ap.add_argument("--text", help="its referring expression")
    ap.add_argument("--out", help="output PNG for --image/--text")
    ap.add_argument("--pairs", help="JSONL of {\"image\": path, \"text\": expression}")
    ap.add_argument("--out-dir", help="output folder for --pairs")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threshold", type=float, help="mask probability threshold (default: the model's, 0.35)")
    args = ap.parse_args(argv)
    if args.pairs is None and not (args.image and args.text and args.out):
        ap.error("give --image, --text and --out, or --pairs and --out-dir")
    if args.pairs is not None and not args.out_dir:
        ap.error("--pairs needs --out-dir")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from finetune.checkpoint import load_finetuned
    from pretrain.config import ConfigError
    from shards.decode import DecodeError
    from shards.inputs import InputError, writable_dir

    try:
        if args.text is not None and not args.text.strip():
            raise InputError("--text", "empty expression (nothing to ground)")
        if args.out:
            writable_dir(Path(args.out).parent, "folder of --out")
        if args.out_dir:
            writable_dir(args.out_dir, "--out-dir")
        if args.image:
            read_image(args.image)              # a bad path fails before the model loads
        pairs, bad = read_pairs(args.pairs) if args.pairs else ([(args.image, args.text)], 0)
        model, cfg, tokenizer = load_finetuned(args.checkpoint, args.device)
    except (FileNotFoundError, ConfigError, DecodeError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kw = {"image_size": cfg.data.image_size, "max_len": cfg.data.max_len, "device": args.device,
          "threshold": args.threshold}
    if not args.pairs:
        try:
            image = read_image(args.image)
        except DecodeError as e:
            print(f"error: {args.image}: not a readable image ({e})", file=sys.stderr)
            return 2
        pred = predict_image(model, image, args.text, tokenizer, **kw)
        try:
            draw_prediction(to_pil(image), pred["bbox"], pred["mask"], _caption(args.text, pred),
                            pred.get("bboxes")).save(args.out, format="PNG")
        except OSError as e:
            print(f"error: {args.out}: cannot write ({e.strerror or e})", file=sys.stderr)
            return 2
        print(json.dumps({"image": args.image, "text": args.text, "bbox": pred["bbox"], **_multi_fields(pred, False),
                          "out": args.out}))
        return 0
    out_dir = Path(args.out_dir)
    lines, skipped = [], {"bad_line": bad, "bad_image": 0, "empty_text": 0}
    for i, (img_path, text) in enumerate(pairs):
        if not text.strip():
            print(f"skipped: line {i + 1}: empty expression", file=sys.stderr)
            skipped["empty_text"] += 1
            continue
        try:
            image = read_image(img_path)
        except (FileNotFoundError, DecodeError, OSError) as e:
            print(f"skipped: {img_path}: {e}", file=sys.stderr)
            skipped["bad_image"] += 1
            continue
        pred = predict_image(model, image, text, tokenizer, **kw)
        png = out_dir / f"{i:05d}_{Path(img_path).stem}.png"
        draw_prediction(to_pil(image), pred["bbox"], pred["mask"], _caption(text, pred),
                        pred.get("bboxes")).save(png, format="PNG")
        lines.append({"image": img_path, "text": text, "bbox": pred["bbox"], "mask": encode_mask(pred["mask"]),
                      **_multi_fields(pred, True), "out": str(png)})
    with (out_dir / "predictions.jsonl").open("w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    print(json.dumps({"written": len(lines), "skipped": skipped, "out_dir": str(out_dir)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
