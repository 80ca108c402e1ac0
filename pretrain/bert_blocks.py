"""BERT layers on torch SDPA with a bidirectional padding mask, keeping `transformers`' parameter names.

Why not `transformers.BertLayer` itself: in transformers 5 a BERT layer with cross-attention must be a decoder,
and `BertModel` then makes self-attention causal (STACK_NOTES.md). X-VLM's fusion encoder is bidirectional, so
the attention here is our own (query/key/value + `F.scaled_dot_product_attention`, which picks flash /
memory-efficient kernels on GPU) while the output sub-modules are transformers' own `BertSelfOutput`,
`BertIntermediate`, `BertOutput`. A `BertBlock`'s state dict has exactly `BertLayer`'s keys
(`attention.self.query.weight`, ..., `crossattention.*`, `intermediate.dense.*`, `output.LayerNorm.*`), so
a BERT checkpoint loads into it unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertIntermediate, BertOutput, BertSelfOutput


class SdpaAttention(nn.Module):
    """Multi-head attention of `x` over `kv` (itself for self-attention); names as BertSelfAttention."""

    def __init__(self, config: BertConfig, kv_dim: int | None = None):
        super().__init__()
        d = config.hidden_size
        if d % config.num_attention_heads:
            raise ValueError(f"hidden size {d} is not a multiple of {config.num_attention_heads} heads")
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        kv_dim = kv_dim or d
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(kv_dim, d)
        self.value = nn.Linear(kv_dim, d)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x: Tensor, kv: Tensor | None = None, key_mask: Tensor | None = None,
                kv_index: Tensor | None = None) -> Tensor:
        """x [B, Lq, d], kv [B, Lk, kv_dim], key_mask [B, Lk] (nonzero/True = attend) -> [B, Lq, d].

        With `kv_index` [B], kv holds U distinct rows [U, Lk, kv_dim] and sequence i attends to row
        kv_index[i]: keys and values are projected once per distinct row (X-VLM's ITM pairs reuse each image
        several times). Pass key_mask=None when every key is real: SDPA can then use the flash kernel.
        """
        kv = x if kv is None else kv
        b, lq, _ = x.shape
        lk = kv.shape[1]
        k, v = self.key(kv), self.value(kv)
        if kv_index is not None:
            k, v = k[kv_index], v[kv_index]
        q = self.query(x).view(b, lq, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, lk, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, lk, self.num_heads, self.head_dim).transpose(1, 2)
        mask = None if key_mask is None else key_mask.bool()[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout_p if self.training else 0.0)
        return out.transpose(1, 2).reshape(b, lq, -1)


class BertAttentionBlock(nn.Module):
    """Attention + residual + LayerNorm; `.self` / `.output` as in transformers' BertAttention."""

    def __init__(self, config: BertConfig, kv_dim: int | None = None):
        super().__init__()
        self.self = SdpaAttention(config, kv_dim)
        self.output = BertSelfOutput(config)

    def forward(self, x: Tensor, kv: Tensor | None = None, key_mask: Tensor | None = None,
                kv_index: Tensor | None = None) -> Tensor:
        return self.output(self.self(x, kv, key_mask, kv_index), x)


class BertBlock(nn.Module):
    """One BERT layer: bidirectional self-attention, optional cross-attention over `encoder_states`, FFN."""

    def __init__(self, config: BertConfig, cross_attention_dim: int | None = None):
        super().__init__()
        self.attention = BertAttentionBlock(config)
        if cross_attention_dim is not None:
            self.crossattention = BertAttentionBlock(config, kv_dim=cross_attention_dim)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x: Tensor, mask: Tensor | None = None, encoder_states: Tensor | None = None,
                encoder_mask: Tensor | None = None, encoder_index: Tensor | None = None) -> Tensor:
        x = self.attention(x, None, mask)
        if encoder_states is not None:
            x = self.crossattention(x, encoder_states, encoder_mask, encoder_index)
        return self.output(self.intermediate(x), x)


def init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation: normal(0, std) for Linear/Embedding weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def run_layers(layers: nn.ModuleList, x: Tensor, checkpointing: bool, *args) -> Tensor:
    """Apply `layers` in order, each under torch.utils.checkpoint when `checkpointing` and training."""
    for layer in layers:
        if checkpointing and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(layer, x, *args, use_reentrant=False)
        else:
            x = layer(x, *args)
    return x
