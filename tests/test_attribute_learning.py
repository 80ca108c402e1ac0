"""bench/attribute_learning.py: the reader pools exactly the object's cells of the token grid, and its two heads
split the logits into shape and colour."""
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from attribute_learning import AttributeReader  # noqa: E402


class _Grid(nn.Module):
    """A stand-in CNN: the image's mean over 16x16 cells as a 3-channel stride-16 feature map."""

    class _Info:
        @staticmethod
        def channels():
            return [3]

    feature_info = _Info()

    def forward(self, x):
        return [nn.functional.avg_pool2d(x, 16)]


def test_reader_pools_the_object_cells_only():
    text = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    reader = AttributeReader(None, _Grid(), n_shapes=5, n_colours=6, text=text)
    with torch.no_grad():
        reader.head.weight.copy_(torch.zeros(11, 3))
        reader.head.weight[0, 0] = 1.0                   # shape logit 0 = channel 0 of the pooled feature
        reader.head.weight[5, 1] = 1.0                   # colour logit 0 = channel 1
        reader.head.bias.zero_()
    image = torch.zeros(2, 3, 64, 64)
    image[:, 0, :16, :16] = 4.0                          # cell (0, 0): channel 0 = 4
    image[:, 1, 32:, 32:] = 2.0                          # cells (2..3, 2..3): channel 1 = 2
    mask = torch.zeros(2, 64, 64)
    mask[0, :16, :16] = 1                                # sample 0: the object is cell (0, 0)
    mask[1, 32:48, 32:64] = 1                            # sample 1: cells (2, 2) and (2, 3)
    shape, colour = reader(image, mask)
    assert shape.shape == (2, 5) and colour.shape == (2, 6)
    assert torch.allclose(shape[:, 0], torch.tensor([4.0, 0.0]))
    assert torch.allclose(colour[:, 0], torch.tensor([0.0, 2.0]))


def test_save_backbone_is_an_export_finetune_starts_from(tmp_path):
    """--save: the trained ViT and text encoder as a pretraining-style export; `init_from` adopts its architecture
    and tokenizer and load_pretrained gives the fine-tuning model exactly those weights."""
    from attribute_learning import save_backbone
    from finetune.checkpoint import adopt_pretrained_architecture, load_pretrained
    from finetune.config import FinetuneConfig
    from finetune.task import build_model
    from pretrain.config import load_config

    small = ["init_from=null", "model.vision.timm_kwargs={depth: 2}", "model.global_blocks=[1]",
             "model.text={hidden_size: 48, num_layers: 2, text_layers: 1, num_heads: 2, intermediate_size: 96}"]
    cfg = load_config(FinetuneConfig, "configs/finetune/demo.yaml", small)
    torch.manual_seed(0)
    model = build_model(cfg.model, 100)
    text = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    tok_dir = tmp_path / "tokenizer"
    save_backbone(AttributeReader(model, None, 5, 6, text), cfg, tok_dir, tmp_path / "run")
    ft = adopt_pretrained_architecture(load_config(FinetuneConfig, "configs/finetune/demo.yaml",
                                                   [f"init_from={tmp_path / 'run'}", "model.global_blocks=[1]"]))
    assert ft.model.text.tokenizer == str(tok_dir.resolve()) and ft.model.text.hidden_size == 48
    assert ft.model.vision.timm_kwargs == {"depth": 2} and ft.model.vision.conv_stem_add
    torch.manual_seed(1)
    other = build_model(ft.model, 100)
    assert load_pretrained(other, tmp_path / "run", ["vision", "text"])["vision"] > 0
    for (k, a), b in zip(model.vision.vit.state_dict().items(), other.vision.vit.state_dict().values()):
        assert torch.equal(a, b), k
    for (k, a), b in zip(model.text.state_dict().items(), other.text.state_dict().values()):
        assert torch.equal(a, b), k
