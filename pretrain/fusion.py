"""X-VLM's cross-modal (fusion) encoder: BERT layers [text_layers, num_layers) with cross-attention.

Each layer: bidirectional self-attention over the text (padding mask), cross-attention over visual tokens
(optionally with a key mask: a region's patches), FFN. Parameter names are BertLayer's (`layer.{i}.attention.*`,
`layer.{i}.crossattention.*`, ...) with i counted from the first fusion layer, so BERT layer text_layers + i of
a checkpoint loads into fusion layer i; cross-attention weights are new (random init).
"""
from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn
from transformers import BertConfig

from .bert_blocks import BertBlock, init_bert_weights, run_layers
from .config import TextConfig
from .encoders import build_bert_config, load_bert_layers, read_bert_state_dict


class FusionEncoder(nn.Module):
    def __init__(self, config: BertConfig, num_layers: int, vision_dim: int):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList(BertBlock(config, cross_attention_dim=vision_dim) for _ in range(num_layers))
        self.grad_checkpointing = False
        init_bert_weights(self, config.initializer_range)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, text: Tensor, text_mask: Tensor, image: Tensor, image_mask: Tensor | None = None,
                image_index: Tensor | None = None) -> Tensor:
        """text [B, L, d] (+ mask [B, L]), image tokens [B, 1+N, Dv] (+ key mask [B, 1+N] or None) -> [B, L, d].

        With `image_index` [B], `image` holds U distinct token sets [U, 1+N, Dv] and text i attends to
        image[image_index[i]] (cross-attention keys/values are then computed once per distinct image).
        """
        return run_layers(self.layer, text, self.grad_checkpointing, text_mask, image, image_mask, image_index)


def build_fusion_encoder(cfg: TextConfig, vision_dim: int, vocab_size: int | None = None, *,
                         bert_state_dict: Mapping[str, Tensor] | None = None) -> FusionEncoder:
    """Fusion layers of the BERT described by `cfg`; self-attention/FFN weights from `cfg.bert` when set."""
    config = build_bert_config(cfg, vocab_size)
    enc = FusionEncoder(config, config.num_hidden_layers - cfg.text_layers, vision_dim)
    if cfg.bert:
        sd = bert_state_dict if bert_state_dict is not None else read_bert_state_dict(cfg.bert)
        load_bert_layers(enc, sd, first_layer=cfg.text_layers, new_prefixes=(".crossattention.",))
    return enc
