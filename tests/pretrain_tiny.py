"""Tiny X-VLM configs for the pretrain tests (imported by tests/test_pretrain_*.py)."""
from pretrain.config import PretrainConfig, load_config

TINY = ["model.vision.name=vit_tiny_patch16_224", "model.vision.img_size=32",
        "model.text.vocab_size=200", "model.text.hidden_size=64", "model.text.num_layers=4",
        "model.text.num_heads=2", "model.text.intermediate_size=128", "model.text.text_layers=2",
        "model.text.max_len=12", "model.embed_dim=32",
        "data.batch_size=4", "data.region_texts=6", "data.region_images=3", "data.max_masks=3"]


def tiny_cfg(*overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, TINY + list(overrides))
