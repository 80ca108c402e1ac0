"""Linear probes on a fine-tuned grounding model's visual tokens: can an object's colour and shape be read from
the tokens it covers? Tells which visual property the backbone has learnt (bench/learning.py says which ones the
answers use).

    python bench/token_probe.py --run runs/learning/a --data runs/learning/data/seed0-images1280

For every distinct target object of the synthetic refcoco `train` and `val` splits (up to --objects each), the
backbone's final tokens are computed once with a neutral expression (--text; LAW conditions the tokens on it) and
averaged over the object's mask, weighted by how much of each grid cell it covers. A multinomial logistic
regression (L-BFGS, small L2) is fit on the train objects and scored on the val objects for two labels read from
the COCO category ("red circle" -> colour red, shape circle). Prints train / val accuracy and chance per label;
the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))   # after the project root: bench/shards.py must not shadow the package
from attribute_learning import object_labels, object_mean  # noqa: E402


@torch.no_grad()
def object_features(model, cfg, tok, shard_dir: Path, labels: dict[int, tuple[str, str]], limit: int, text: str):
    """-> features [n, C] (mask-weighted mean of the final visual tokens) and the (shape, colour) of n objects."""
    from shards.index import GroundingDataset

    ds = GroundingDataset(str(shard_dir), tok, train=False, image_size=cfg.data.image_size)
    enc = tok(text, padding="max_length", truncation=True, max_length=cfg.data.max_len, return_attention_mask=True)
    ids, msk = torch.tensor([enc["input_ids"]]), torch.tensor([enc["attention_mask"]])
    words = model.encode_text(ids, msk)
    seen, feats, names = set(), [], []
    for i in range(len(ds)):
        t = ds.target(i)
        if t["ann_id"] in seen:
            continue
        seen.add(t["ann_id"])
        item = ds[i]
        vis, hw = model.vision(item["image"][None].float(), words, msk)
        feat, cover = object_mean(vis, hw, item["mask"][None])
        if cover[0] <= 0:
            continue
        feats.append(feat[0])
        names.append(labels[int(t["ann_id"])])
        if len(feats) >= limit:
            break
    return torch.stack(feats).float(), names


def linear_probe(x_tr: torch.Tensor, y_tr: list[str], x_va: torch.Tensor, y_va: list[str],
                 l2: float = 1e-3) -> dict:
    """Multinomial logistic regression on standardised features: {"train", "val", "chance", "classes"}."""
    classes = sorted(set(y_tr))
    index = {c: i for i, c in enumerate(classes)}
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    a, b = (x_tr - mu) / sd, (x_va - mu) / sd
    ya = torch.tensor([index[c] for c in y_tr])
    yb = torch.tensor([index.get(c, -1) for c in y_va])           # a class unseen in train counts as wrong
    torch.manual_seed(0)
    lin = torch.nn.Linear(a.shape[1], len(classes))
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=300)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(a), ya) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return {"train": (lin(a).argmax(1) == ya).float().mean().item(),
                "val": (lin(b).argmax(1) == yb).float().mean().item(), "chance": 1.0 / len(classes),
                "classes": len(classes)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a fine-tuning run dir or export (finetune.checkpoint)")
    ap.add_argument("--data", type=Path, required=True, help="a `shards demo` / bench/learning.py data dir")
    ap.add_argument("--text", default="the shape", help="the neutral expression LAW conditions the tokens on")
    ap.add_argument("--objects", type=int, default=1500, help="objects per split at most")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    from finetune.checkpoint import load_finetuned
    from shards.inputs import InputError

    torch.set_num_threads(args.threads)
    try:
        labels = object_labels(args.data)
        model, cfg, tok = load_finetuned(args.run)
    except (InputError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.eval()
    shards = args.data / "shards" / "refcoco"
    x_tr, n_tr = object_features(model, cfg, tok, shards / "train", labels, args.objects, args.text)
    x_va, n_va = object_features(model, cfg, tok, shards / "val", labels, args.objects, args.text)
    result = {"run": str(args.run), "objects": {"train": len(n_tr), "val": len(n_va)}, "text": args.text}
    for label, part in (("colour", 1), ("shape", 0)):
        r = linear_probe(x_tr, [n[part] for n in n_tr], x_va, [n[part] for n in n_va])
        result[label] = r
        print(f"{label:7s} train {r['train']:.3f}  val {r['val']:.3f}  chance {r['chance']:.3f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
