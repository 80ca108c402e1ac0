"""How fast does a backbone learn what the expressions name? Object shape and colour under direct supervision.

    python bench/attribute_learning.py                                        # the demo config's ViT, data drawn once
    python bench/attribute_learning.py --data runs/demo                       # on the demo's data
    python bench/attribute_learning.py --data runs/demo --cnn resnet18        # a plain CNN, the reference
    python bench/attribute_learning.py --data runs/demo --init runs/demo/pretrain --frozen   # what pretraining taught
    python bench/attribute_learning.py --data runs/demo --lr 3e-4 model.vision.pos_embed_init=random

The grounding losses teach the backbone an object's shape only indirectly (through which object an expression
names), and bench/learning.py takes ten minutes a point. This bench asks the backbone question alone, about ten
times cheaper: the fine-tuning config's backbone (plus dotted overrides; LAW conditioned on one neutral
expression, --text) is trained on the synthetic refcoco `train` split, one target object per item, with the
training augmentation, to classify the object's shape and its colour from the mask-weighted mean of its final
tokens (two linear heads, AdamW, batch --batch). Every steps/evals steps it scores held-out `val` objects (one
item per object, at most --objects). `--cnn NAME`: a timm CNN's stride-16 features instead of the ViT (a
reference for what is learnable from this data at this budget). `--init RUN`: start the ViT from a pretraining
export; `--frozen`: train only the heads (a linear probe of what the export already encodes). `--save DIR`: write
the trained ViT and text encoder as a pretraining-style export (DIR/export/{model.safetensors, config.yaml}) that
`init_from` / bench/learning.py `--init` read: fine-tuning from a backbone that was told shapes.

Prints one line per evaluation (train loss, held-out shape and colour accuracy, chance, seconds); the last line is
one JSON object. Runs with one thread (--threads); two settings compare side by side as two processes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))   # after the project root: bench/shards.py must not shadow the package


class AttributeReader(torch.nn.Module):
    """Backbone -> tokens on a grid -> mask-weighted mean over the object -> shape and colour logits."""

    def __init__(self, model, cnn: torch.nn.Module | None, n_shapes: int, n_colours: int, text: dict) -> None:
        super().__init__()
        self.model, self.cnn, self.n_shapes = model, cnn, n_shapes
        width = cnn.feature_info.channels()[-1] if cnn is not None else model.vision.embed_dim
        self.head = torch.nn.Linear(width, n_shapes + n_colours)
        self.register_buffer("ids", text["input_ids"], persistent=False)
        self.register_buffer("mask", text["attention_mask"], persistent=False)

    def tokens(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if self.cnn is not None:
            f = self.cnn(image)[-1]
            return f.flatten(2).transpose(1, 2), tuple(f.shape[-2:])
        B = image.shape[0]
        ids, mask = self.ids.expand(B, -1), self.mask.expand(B, -1)
        return self.model.vision(image, self.model.encode_text(ids, mask), mask)

    def forward(self, image: torch.Tensor, obj_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tok, hw = self.tokens(image)
        logits = self.head(object_mean(tok, hw, obj_mask)[0])
        return logits[:, : self.n_shapes], logits[:, self.n_shapes:]


def object_mean(tokens: torch.Tensor, hw: tuple[int, int], masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [B,N,C] on grid hw, object masks [B,S,S] -> (the mean of the tokens weighted by how much of each grid
    cell the object covers [B,C], the total cover [B]; an object that covers no cell gets zeros)."""
    cover = F.adaptive_avg_pool2d(masks[:, None].float(), hw).flatten(1)[..., None]
    total = cover.sum(1)
    return (tokens * cover).sum(1) / total.clamp_min(1e-6), total[:, 0]


def object_labels(data: Path) -> dict[int, tuple[str, str]]:
    """ann_id -> (shape, colour), from the synthetic refcoco instances file ("red circle")."""
    from shards.refer import load_instances

    inst = load_instances(data / "raw" / "refer" / "refcoco" / "instances.json")
    cat = {int(c["id"]): c["name"].split() for c in inst["categories"]}
    return {int(a["id"]): (cat[int(a["category_id"])][-1], cat[int(a["category_id"])][0])
            for a in inst["annotations"]}


def build_reader(args: argparse.Namespace, tok, shapes: list[str], colours: list[str]) -> AttributeReader:
    from finetune.checkpoint import load_pretrained
    from finetune.config import FinetuneConfig
    from finetune.task import build_model
    from pretrain.config import load_config

    cfg = load_config(FinetuneConfig, args.config, ["init_from=null"] + list(args.overrides))
    model = build_model(cfg.model, len(tok))
    if args.init:
        load_pretrained(model, args.init, ["vision"])
    cnn = None
    if args.cnn:
        from pretrain.encoders import build_cnn_trunk

        cnn = build_cnn_trunk(args.cnn, 16, "--cnn", "the ViT's token stride")
    text = tok(args.text, padding="max_length", max_length=cfg.data.max_len, truncation=True, return_tensors="pt")
    reader = AttributeReader(model, cnn, len(shapes), len(colours), text)
    if args.frozen:
        for p in list(model.parameters()) + ([] if cnn is None else list(cnn.parameters())):
            p.requires_grad_(False)
    return reader, cfg


def run(args: argparse.Namespace) -> dict:
    from shards.index import GroundingDataset, collate_grounding
    from shards.text import build_tokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = build_tokenizer(str(args.data / "tokenizer"))
    labels = object_labels(args.data)
    shapes = sorted({s for s, _ in labels.values()})
    colours = sorted({c for _, c in labels.values()})
    reader, cfg = build_reader(args, tok, shapes, colours)
    size, max_len = cfg.data.image_size, cfg.data.max_len
    shard = args.data / "shards" / "refcoco"
    train = GroundingDataset(shard / "train", tok, train=True, image_size=size, max_len=max_len, seed=args.seed)
    val = GroundingDataset(shard / "val", tok, train=False, image_size=size, max_len=max_len)

    def item_targets(ds) -> tuple[list[int], torch.Tensor]:
        """(each item's ann_id, its [shape, colour] class indices [len(ds), 2]), read once."""
        anns = [int(ds.target(i)["ann_id"]) for i in range(len(ds))]
        return anns, torch.tensor([[shapes.index(labels[a][0]), colours.index(labels[a][1])] for a in anns])

    _, train_targets = item_targets(train)
    val_anns, val_targets = item_targets(val)
    first: dict[int, int] = {}          # object -> its first item, in the order the objects first appear
    for i, a in enumerate(val_anns):
        first.setdefault(a, i)
    held = list(first.values())[: args.objects]
    held_shape, held_colour = val_targets[held].unbind(1)

    @torch.no_grad()
    def evaluate() -> tuple[float, float]:
        reader.eval()
        ps, pc = [], []
        for j in range(0, len(held), 32):
            b = collate_grounding([val[i] for i in held[j: j + 32]])
            s, c = reader(b["image"], b["mask"])
            ps.append(s.argmax(1))
            pc.append(c.argmax(1))
        reader.train(not args.frozen)
        return ((torch.cat(ps) == held_shape).float().mean().item(),
                (torch.cat(pc) == held_colour).float().mean().item())

    head = list(reader.head.parameters())
    backbone = [p for p in reader.parameters() if p.requires_grad and all(p is not h for h in head)]
    opt = torch.optim.AdamW([{"params": backbone, "lr": args.lr * args.backbone_lr_mult},
                             {"params": head, "lr": args.lr}], weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))
    reader.train(not args.frozen)
    gen = torch.Generator().manual_seed(args.seed)
    every = max(1, args.steps // args.evals)
    curve, losses, t0 = [], [], time.time()
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(train), (args.batch,), generator=gen).tolist()
        batch = collate_grounding([train[i] for i in idx])
        ys, yc = train_targets[idx].unbind(1)
        s, c = reader(batch["image"], batch["mask"])
        loss = F.cross_entropy(s, ys) + F.cross_entropy(c, yc)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % every == 0 or step == args.steps:
            shape_acc, colour_acc = evaluate()
            recent = losses[-every:]
            point = {"step": step, "loss": sum(recent) / len(recent), "shape": shape_acc, "colour": colour_acc,
                     "seconds": round(time.time() - t0, 1)}
            curve.append(point)
            print(f"step {step:5d}  loss {point['loss']:.3f}  held-out shape {shape_acc:.3f} "
                  f"(chance {1 / len(shapes):.2f})  colour {colour_acc:.3f} (chance {1 / len(colours):.2f})  "
                  f"{point['seconds']:.0f} s", flush=True)
    if args.save:
        save_backbone(reader, cfg, args.data / "tokenizer", args.save)
    return {"config": args.config, "overrides": list(args.overrides), "cnn": args.cnn or None,
            "init": args.init or None, "frozen": args.frozen, "lr": args.lr,
            "backbone_lr_mult": args.backbone_lr_mult, "objects": len(held), "curve": curve}


def save_backbone(reader: AttributeReader, cfg, tokenizer: Path, out: Path) -> Path:
    """out/export/{model.safetensors, config.yaml} in the pretraining export's layout: `vision.*` (the timm ViT),
    `text.*` (the text encoder) and the model section, its tokenizer the data's (the text weights index it)."""
    import copy

    from safetensors.torch import save_file

    import yaml

    from pretrain.config import to_dict

    model = reader.model
    sd = {f"vision.{k}": v for k, v in model.vision.vit.state_dict().items()}
    sd.update({f"text.{k}": v for k, v in model.text.state_dict().items()})
    export = out / "export"
    export.mkdir(parents=True, exist_ok=True)
    tmp = export / "model.safetensors.tmp"
    save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, str(tmp), metadata={"format": "pt"})
    tmp.replace(export / "model.safetensors")
    mcfg = copy.deepcopy(cfg.model)
    mcfg.text.tokenizer = str(tokenizer.resolve())
    model_section = {"vision": to_dict(mcfg.vision), "text": to_dict(mcfg.text)}
    (export / "config.yaml").write_text(yaml.safe_dump({"model": model_section}, sort_keys=False))
    return export


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=None,
                    help="a `shards demo` / bench/learning.py data dir (default: draw --images under --out/data)")
    ap.add_argument("--images", type=int, default=1280, help="synthetic COCO images when drawing data")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data drawn")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "learning")
    ap.add_argument("--config", default=str(ROOT / "configs" / "finetune" / "demo.yaml"))
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--evals", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--backbone-lr-mult", type=float, default=1.0)
    ap.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    ap.add_argument("--text", default="the shape", help="the neutral expression LAW conditions the tokens on")
    ap.add_argument("--objects", type=int, default=400, help="held-out val objects scored")
    ap.add_argument("--cnn", default="", help="a timm CNN (e.g. resnet18) instead of the config's ViT")
    ap.add_argument("--init", default="", help="a pretraining run or export to start the ViT from")
    ap.add_argument("--frozen", action="store_true", help="train the heads only (a linear probe)")
    ap.add_argument("--save", type=Path, default=None, help="write the trained ViT + text encoder as an export here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*", help="dotted config overrides (model.vision.pos_embed_init=random)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pretrain.config import ConfigError
    from shards.inputs import InputError

    from learning import resolve_data

    if args.save and args.cnn:                  # the export holds the config's ViT; a --cnn run trains no ViT
        print("error: --save writes the config's ViT and cannot be used with --cnn", file=sys.stderr)
        return 2
    try:
        args.data = resolve_data(args)          # the same data bench/learning.py draws and keeps
        if not (args.data / "tokenizer" / "vocab.txt").is_file():
            raise InputError(args.data, "no tokenizer/vocab.txt (not a `shards demo` or bench/learning.py data dir)")
        result = run(args)
    except (ConfigError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:                        # an --out that cannot be written
        print(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
