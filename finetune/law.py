"""Language adaptive weights (VG-LAW, CVPR 2023): the expression rewrites every ViT block's qkv weights.

For backbone block i: a learnable layer embedding e_i attends over the text tokens in G groups (padding
masked) -> h_0^i; h_1^i = GELU(LN(W_1^i h_0^i)) reduces d_l to d_h = d_l / r; Phi^i(h_1^i) is a d_w x d_w
matrix, and the block's qkv weight becomes W = W_0 + P Phi Q^T with P (d_out x d_w) and Q (d_in x d_w) shared
by all blocks. Phi's weight and bias start at zero (the MindSpore port's default), so training starts from
the unmodified backbone; `init_std > 0` draws Phi's weight from N(0, init_std^2) instead.

All blocks' Phi are produced at once (einsum over the layer axis); the per-sample weight is never built:
x W^T = x W_0^T + ((x Q) Phi^T) P^T is two thin batched matmuls on top of the static projection.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LanguageAdaptiveWeights(nn.Module):
    """Generates Phi for `num_layers` blocks from text features and applies W_0 + P Phi Q^T."""

    def __init__(self, num_layers: int, text_dim: int, in_dim: int, out_dim: int, *,
                 groups: int = 12, reduction: int = 16, rank: int = 32, init_std: float = 0.0) -> None:
        super().__init__()
        if text_dim % groups:
            raise ValueError(f"text width {text_dim} is not divisible by {groups} LAW groups")
        hidden = max(1, text_dim // reduction)
        self.num_layers, self.groups, self.rank = num_layers, groups, rank
        self.layer_embed = nn.Parameter(torch.randn(num_layers, text_dim) * 0.02)
        # W_1^i for every layer as one batched weight, then a per-layer LayerNorm affine.
        self.fc_weight = nn.Parameter(torch.empty(num_layers, hidden, text_dim))
        self.fc_bias = nn.Parameter(torch.zeros(num_layers, hidden))
        self.ln_weight = nn.Parameter(torch.ones(num_layers, hidden))
        self.ln_bias = nn.Parameter(torch.zeros(num_layers, hidden))
        # Phi^i: Linear(d_h -> d_w*d_w), zero weight and bias.
        self.phi_weight = nn.Parameter(torch.zeros(num_layers, rank * rank, hidden))
        self.phi_bias = nn.Parameter(torch.zeros(num_layers, rank * rank))
        # Shared factors; random so that Phi receives a gradient from the first step.
        self.P = nn.Parameter(torch.empty(out_dim, rank))
        self.Q = nn.Parameter(torch.empty(in_dim, rank))
        bound = 1.0 / math.sqrt(text_dim)
        nn.init.uniform_(self.fc_weight, -bound, bound)
        nn.init.normal_(self.P, std=1.0 / math.sqrt(rank))
        nn.init.normal_(self.Q, std=1.0 / math.sqrt(in_dim))
        if init_std > 0:                # the expression changes the weights from the first step (bias stays 0)
            nn.init.normal_(self.phi_weight, std=init_std)

    def aggregate(self, text: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Grouped attention of each layer embedding over the tokens: (h_0 [B,n,d_l], alpha [B,n,G,L])."""
        B, L, D = text.shape
        G, n = self.groups, self.num_layers
        t = text.reshape(B, L, G, D // G)
        e = self.layer_embed.to(text.dtype).reshape(n, G, D // G)
        scores = torch.einsum("blgc,ngc->bngl", t, e) / math.sqrt(D // G)
        pad = ~text_mask.bool()[:, None, None, :]
        alpha = scores.float().masked_fill(pad, float("-inf")).softmax(-1).to(text.dtype)
        h0 = torch.einsum("bngl,blgc->bngc", alpha, t).reshape(B, n, D)
        return h0, alpha

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Text features [B,L,d_l] + mask [B,L] -> Phi [B, num_layers, d_w, d_w]."""
        h0, _ = self.aggregate(text, text_mask)
        h = torch.einsum("bnd,nhd->bnh", h0, self.fc_weight.to(h0.dtype)) + self.fc_bias.to(h0.dtype)
        h = F.layer_norm(h, h.shape[-1:]) * self.ln_weight.to(h.dtype) + self.ln_bias.to(h.dtype)
        h = F.gelu(h)
        phi = torch.einsum("bnh,nkh->bnk", h, self.phi_weight.to(h.dtype)) + self.phi_bias.to(h.dtype)
        return phi.reshape(text.shape[0], self.num_layers, self.rank, self.rank)

    def project(self, x: torch.Tensor, linear: nn.Linear, phi: torch.Tensor | None) -> torch.Tensor:
        """x [B,N,d_in] through (W_0 + P phi Q^T) and W_0's bias; phi [B,d_w,d_w] or None (static)."""
        y = linear(x)
        if phi is None:
            return y
        low = torch.bmm(x @ self.Q.to(x.dtype), phi.transpose(1, 2).to(x.dtype))    # [B,N,d_w]
        # the add rides on the matmul (one addmm kernel instead of a matmul and a [B,N,d_out] add)
        return torch.addmm(y.flatten(0, 1), low.flatten(0, 1).to(y.dtype), self.P.to(y.dtype).t()).view_as(y)
