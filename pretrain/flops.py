"""Analytic FLOPs of a pretraining step, for MFU.

Counts the matrix multiplications (2 FLOPs per multiply-add) of the forward pass: every Linear, attention
scores and weighted sums, the patch embedding; elementwise work (norms, GELU, softmax) is left out, as in the
usual MFU accounting (PaLM appendix B). Backward is taken as twice the forward (caller multiplies by 3);
activation-checkpointing recompute is not counted (MFU, not HFU). timm ViTs are counted analytically; other
timm families (Swin, ConvNets) fall back to torch.utils.flop_counter on one image, once.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn


def linear(tokens: int, d_in: int, d_out: int) -> float:
    return 2.0 * tokens * d_in * d_out


def attention(lq: int, lk: int, d: int) -> float:
    """Scores Q K^T and the weighted sum A V of one sequence: 2 matmuls of lq x lk x d."""
    return 4.0 * lq * lk * d


def bert_layer(seq: int, d: int, ff: int, kv_len: int = 0, kv_dim: int = 0, kv_proj: bool = True) -> float:
    """One BERT layer on one sequence; with cross-attention over kv_len tokens of width kv_dim when kv_len
    (kv_proj=False leaves out the key/value projections, for callers that project shared keys once)."""
    f = linear(seq, d, 3 * d) + attention(seq, seq, d) + linear(seq, d, d) + 2 * linear(seq, d, ff)
    if kv_len:
        f += linear(seq, d, d) + attention(seq, kv_len, d) + linear(seq, d, d)
        if kv_proj:
            f += 2 * linear(kv_len, kv_dim, d)
    return f


def vit_forward(model: nn.Module) -> float:
    """Forward FLOPs of one image through a timm VisionTransformer (tokens out, no head)."""
    pe = model.patch_embed
    n = pe.num_patches
    conv = pe.proj
    f = 2.0 * n * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
    t = n + model.num_prefix_tokens
    for blk in model.blocks:
        for m in blk.modules():
            if isinstance(m, nn.Linear):
                f += linear(t, m.in_features, m.out_features)
        f += attention(t, t, model.embed_dim)
    return f


@lru_cache(maxsize=8)
def _counted_forward(model: nn.Module, img_size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    device = next(model.parameters()).device
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.forward_features(torch.zeros(1, 3, img_size, img_size, device=device))
    return float(counter.get_total_flops())


def vision_forward(model: nn.Module, img_size: int) -> float:
    """Forward FLOPs of one image: analytic for patchify ViTs, counted once for other timm families and for
    ViTs with a convolutional stem (model.vision.conv_stem)."""
    from timm.models.vision_transformer import VisionTransformer
    if isinstance(model, VisionTransformer) and isinstance(getattr(model.patch_embed, "proj", None), nn.Conv2d):
        return vit_forward(model)
    return _counted_forward(model, img_size)


def step_flops(task: nn.Module, batch: int, text_len: int, region_images: int = 0, region_texts: int = 0,
               world_size: int = 1) -> float:
    """Forward FLOPs of one PretrainTask step on one rank (B image-text pairs, M region images, R region texts).

    Mirrors PretrainTask.forward: vision over B + M images, text encoder over 2B + 2R texts, per level one
    fusion pass over 4 sequences per pair (ITM positive, 2 negatives, MLM) plus the box pass for regions,
    with cross-attention keys/values projected once per distinct visual token set (B images; R concepts +
    M region images), ITC logits against the global batch, and the heads.
    """
    cfg = task.text.config
    d, ff, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    vdim = task.vision.num_features
    img_size = task.cfg.model.vision.img_size
    n_tok = _num_tokens(task, img_size)
    k_mlm = min(task.mlm_positions, text_len)
    e = task.vision_proj.out_features

    f = (batch + region_images) * vision_forward(task.vision, img_size)
    f += (2 * batch + 2 * region_texts) * len(task.text.layer) * bert_layer(text_len, d, ff)

    def level(n: int, fusion_seqs: int, visual_sets: int) -> float:
        g = n * (linear(1, vdim, e) + linear(1, d, e))                   # projections
        g += 2 * linear(n, e, n * world_size)                             # ITC logits, both directions
        g += fusion_seqs * len(task.fusion.layer) * bert_layer(text_len, d, ff, n_tok, vdim, kv_proj=False)
        g += visual_sets * len(task.fusion.layer) * 2 * linear(n_tok, vdim, d)
        g += 3 * n * (linear(1, d, 2 * d) + linear(1, 2 * d, 2))          # ITM head
        g += n * k_mlm * (linear(1, d, d) + linear(1, d, vocab))          # MLM head
        return g

    f += level(batch, 4 * batch, batch)
    if region_texts:
        f += level(region_texts, 5 * region_texts, region_texts + region_images)
        f += region_texts * (linear(1, d, 2 * d) + linear(1, 2 * d, 4))  # box head
    return f


def _num_tokens(task: nn.Module, img_size: int) -> int:
    """1 + N visual tokens per image, as vision_tokens returns them (shape read off one dry run for non-ViTs)."""
    from timm.models.vision_transformer import VisionTransformer
    if isinstance(task.vision, VisionTransformer):
        return task.vision.patch_embed.num_patches + 1
    return _dry_run_tokens(task.vision, img_size)


@lru_cache(maxsize=8)
def _dry_run_tokens(model: nn.Module, img_size: int) -> int:
    from .encoders import vision_tokens
    device = next(model.parameters()).device
    with torch.no_grad():
        return vision_tokens(model, torch.zeros(1, 3, img_size, img_size, device=device)).shape[1]
