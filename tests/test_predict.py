"""finetune.predict: a PNG of the input's size with the model's box drawn where the model put it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from finetune.checkpoint import load_finetuned
from finetune.config import save_config
from finetune.predict import BOX_COLOUR, main, predict_image, read_image
from finetune.task import build_task
from finetune_helpers import tiny_config
from loader_shards import WORDS
from shards.text import build_vocab_tokenizer


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A fine-tuning export (model.safetensors + config.yaml) of a tiny random VG-LAW."""
    root = tmp_path_factory.mktemp("ft")
    tok_dir = root / "tok"
    tok = build_vocab_tokenizer(WORDS, tok_dir)
    cfg = tiny_config(**{"model.text.tokenizer": str(tok_dir), "model.text.max_len": 16, "data.max_len": 16})
    torch.manual_seed(0)
    task = build_task(cfg, tok)
    with torch.no_grad():                       # a box well inside the image, whatever the input
        task.model.rec_head.mlp[-1].bias.copy_(torch.tensor([0.3, 0.4, -1.0, -1.2]))
    exp = root / "export"
    exp.mkdir()
    save_file({k: v.contiguous() for k, v in task.state_dict().items()}, str(exp / "model.safetensors"))
    save_config(cfg, exp / "config.yaml")
    return exp


@pytest.fixture
def image_path(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 120, (90, 150, 3), dtype=np.uint8)          # 150 wide x 90 high, not square
    p = tmp_path / "img.jpg"
    Image.fromarray(arr).save(p, quality=95)
    return p


def test_predict_writes_png_with_box_where_the_model_put_it(export, image_path, tmp_path):
    out = tmp_path / "out.png"
    assert main(["--checkpoint", str(export), "--image", str(image_path), "--text", "the red car on the left",
                 "--out", str(out), "--device", "cpu"]) == 0
    png = Image.open(out)
    png.load()
    assert png.format == "PNG" and png.size == (150, 90)
    model, cfg, tok = load_finetuned(export)
    pred = predict_image(model, read_image(image_path), "the red car on the left", tok,
                         image_size=cfg.data.image_size, max_len=cfg.data.max_len)
    x, y, w, h = pred["bbox"]
    assert w > 10 and h > 10 and x > 0 and y > 20                  # clear of the image border and the caption
    arr = np.asarray(png.convert("RGB"))
    x0, y0, x1, y1 = round(x), round(y), round(x + w) - 1, round(y + h) - 1
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    for px, py in [(x0, cy), (x1, cy), (cx, y1)]:                  # left, right, bottom edges
        assert tuple(arr[py, px]) == BOX_COLOUR
    assert tuple(arr[cy, cx]) != BOX_COLOUR


def test_predict_pairs_and_user_mistakes(export, image_path, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join([json.dumps({"image": str(image_path), "text": "a dog"}), "{broken",
                                json.dumps({"image": str(tmp_path / "missing.jpg"), "text": "a cat"}),
                                json.dumps({"image": str(image_path), "text": " \t "})]) + "\n")
    out_dir = tmp_path / "preds"
    assert main(["--checkpoint", str(export), "--pairs", str(pairs), "--out-dir", str(out_dir)]) == 0
    lines = [json.loads(s) for s in (out_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and Image.open(lines[0]["out"]).size == (150, 90)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped"] == {"bad_line": 1, "bad_image": 1,
                                                                                    "empty_text": 1}
    assert main(["--checkpoint", str(export), "--image", str(tmp_path / "nope.jpg"), "--text", "x",
                 "--out", str(tmp_path / "o.png")]) == 2
    assert main(["--checkpoint", str(tmp_path), "--image", str(image_path), "--text", "x",
                 "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("error: ") for e in err)
