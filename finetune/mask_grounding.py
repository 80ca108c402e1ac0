"""Mask Grounding (MagNet, CVPR 2024): a training-only auxiliary task that predicts masked expression words from
the image, the surrounding words and where the referred object is.

MagNet's training code was never released; this follows the paper: mask some expression tokens, encode the
ground-truth mask's centre (here optionally with its box) by a 2-layer MLP into a mask embedding C, project the
language features O of the masked text and the image features P to one width, run a small BERT-like encoder
over Concat([O, P, C]) and take the cross-entropy on the masked positions. The predictor's layers are
`pretrain.bert_blocks.BertBlock` (bidirectional, SDPA).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig

from pretrain.bert_blocks import BertBlock, init_bert_weights


def mask_tokens(ids: torch.Tensor, attn_mask: torch.Tensor, ratio: float, mask_id: int,
                special_ids: tuple[int, ...], generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace round(ratio * #words) (at least one) random word tokens of each expression by [MASK].

    Returns (masked ids, bool positions [B,L]). Special tokens and padding are never masked; an expression
    with no word token stays unmasked (and contributes nothing to the loss).
    """
    eligible = attn_mask.bool()
    for s in special_ids:
        eligible &= ids != s
    n_words = eligible.sum(-1)
    n_mask = torch.where(n_words > 0, (n_words.float() * ratio).round().clamp(min=1), torch.zeros_like(n_words.float()))
    scores = torch.rand(ids.shape, generator=generator, device="cpu").to(ids.device)
    scores = scores.masked_fill(~eligible, 2.0)             # ineligible last
    rank = scores.argsort(-1).argsort(-1)                   # rank of each position among the row's scores
    chosen = (rank < n_mask[:, None]) & eligible
    return ids.masked_fill(chosen, mask_id), chosen


def mask_centre_box(masks: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Centre of mass of each 0/1 mask [B,S,S] in normalised (x, y), falling back to the box centre for an
    empty mask; concatenated with the normalised (cx,cy,w,h) box -> [B, 6]."""
    _, H, W = masks.shape
    m = masks.float()
    area = m.sum((1, 2))
    ys = (torch.arange(H, device=m.device, dtype=m.dtype) + 0.5) / H
    xs = (torch.arange(W, device=m.device, dtype=m.dtype) + 0.5) / W
    cx = (m.sum(1) * xs).sum(-1) / area.clamp(min=1)
    cy = (m.sum(2) * ys).sum(-1) / area.clamp(min=1)
    centre = torch.stack([cx, cy], -1)
    centre = torch.where(area[:, None] > 0, centre, boxes[:, :2].float())
    return torch.cat([centre, boxes.float()], -1)


class MaskGrounding(nn.Module):
    """Masked-token predictor over [masked-text features, image features, mask embedding]."""

    def __init__(self, text_dim: int, vis_dim: int, vocab_size: int, *, dim: int = 256, depth: int = 2,
                 heads: int = 8, use_box: bool = True) -> None:
        super().__init__()
        self.use_box = use_box
        self.text_proj = nn.Linear(text_dim, dim)
        self.vis_proj = nn.Linear(vis_dim, dim)
        self.mask_embed = nn.Sequential(nn.Linear(6 if use_box else 2, dim), nn.GELU(), nn.Linear(dim, dim))
        self.type_embed = nn.Embedding(3, dim)              # 0 text, 1 image, 2 mask embedding
        self.norm = nn.LayerNorm(dim)
        cfg = BertConfig(hidden_size=dim, num_attention_heads=heads, intermediate_size=4 * dim,
                         hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0)
        self.layers = nn.ModuleList(BertBlock(cfg) for _ in range(depth))
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim), nn.Linear(dim, vocab_size))
        init_bert_weights(self, std=0.02)

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, visual: torch.Tensor, masks: torch.Tensor,
                boxes: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """text [B,L,d_l] (features of the masked text), visual [B,N,C], GT masks [B,S,S] and boxes [B,4],
        masked positions [B,L] (bool) and their true ids [B,L] -> mean CE over masked tokens (0 if none)."""
        where = mask_centre_box(masks, boxes).to(self.text_proj.weight.dtype)
        c = self.mask_embed(where if self.use_box else where[:, :2])[:, None]
        o = self.text_proj(text) + self.type_embed.weight[0]
        p = self.vis_proj(visual) + self.type_embed.weight[1]
        x = self.norm(torch.cat([o, p, c + self.type_embed.weight[2]], 1))
        ones = torch.ones(visual.shape[0], visual.shape[1] + 1, dtype=torch.bool, device=visual.device)
        key_mask = torch.cat([text_mask.bool(), ones], 1)
        for layer in self.layers:
            x = layer(x, key_mask)
        tokens = x[:, : text.shape[1]][positions]           # only the masked positions reach the vocab head
        if tokens.shape[0] == 0:
            return x.sum() * 0.0
        return F.cross_entropy(self.head(tokens).float(), labels[positions])
