"""MagNet's cross-modal alignment module (CAM), applied once to VG-LAW's backbone output
(../shared/METHODS.md §3; MagNet, CVPR 2024, the CAM equations):

    P^k            = MLP_k(Pool_k(P))                      k = 1..K pooling windows (a feature pyramid)
    O^k_p2t, P^k_t2p = X-MHA_k(O, P^k)                     text attends to P^k; P^k attends to the text
    O_p2t = Concat_k(O^k_p2t),   P_t2p = Concat_k(Up(P^k_t2p))     (Up: bilinear back to the token grid)
    O' = O + tanh(MLP(O_p2t)),   P' = P + tanh(MLP(P_t2p))

O are the text features [B, L, d_l], P the visual tokens [B, H*W, C]. The last layer of both output MLPs starts
at zero, so the gate tanh(.) starts at 0 and the module starts as the identity: switching it on does not change
the model it is added to until it has learnt something. MagNet puts a CAM at the end of each of its four
encoder stages; VG-LAW has no stages and its text enters the ViT through generated weights before the ViT
runs, so here one CAM sits between the backbone and the heads (both heads and the LAP query see its output).
Off by default: VG-LAW's point is to need no fusion module.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def mlp(dims: list[int], zero_last: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.GELU())
    if zero_last:
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)
    return nn.Sequential(*layers)


class CrossModalAlignment(nn.Module):
    def __init__(self, vis_dim: int, text_dim: int, pools: list[int] = (1, 2, 4), heads: int = 4) -> None:
        super().__init__()
        self.pools = [int(k) for k in pools]
        K = len(self.pools)
        self.pyramid = nn.ModuleList(mlp([vis_dim] * 4) for _ in self.pools)               # 3-layer MLP_k
        self.t2p = nn.ModuleList(nn.MultiheadAttention(text_dim, heads, kdim=vis_dim, vdim=vis_dim, batch_first=True)
                                 for _ in self.pools)                                        # text queries
        self.p2t = nn.ModuleList(nn.MultiheadAttention(vis_dim, heads, kdim=text_dim, vdim=text_dim,
                                                       batch_first=True) for _ in self.pools)   # pixel queries
        self.text_out = mlp([K * text_dim, text_dim, text_dim], zero_last=True)
        self.vis_out = mlp([K * vis_dim, vis_dim, vis_dim], zero_last=True)

    def pooled(self, visual: torch.Tensor, hw: tuple[int, int], k: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """Average pooling over k x k token cells (the last partial window kept) -> [B, h*w, C], (h, w)."""
        B, _, C = visual.shape
        size = (math.ceil(hw[0] / k), math.ceil(hw[1] / k))
        fmap = F.adaptive_avg_pool2d(visual.transpose(1, 2).reshape(B, C, *hw), size)
        return fmap.flatten(2).transpose(1, 2), size

    def forward(self, visual: torch.Tensor, hw: tuple[int, int], text: torch.Tensor,
                text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """visual [B, H*W, C] on grid hw, text [B, L, d_l] + mask [B, L] -> (visual', text'), same shapes."""
        B, _, C = visual.shape
        pad = ~text_mask.bool()
        o_parts, p_parts = [], []
        for k, proj, t2p, p2t in zip(self.pools, self.pyramid, self.t2p, self.p2t):
            pk, size = self.pooled(visual, hw, k)
            pk = proj(pk)
            o_parts.append(t2p(text, pk, pk, need_weights=False)[0])
            pt = p2t(pk, text, text, key_padding_mask=pad, need_weights=False)[0]
            up = F.interpolate(pt.transpose(1, 2).reshape(B, C, *size), size=hw, mode="bilinear",
                               align_corners=False)
            p_parts.append(up.flatten(2).transpose(1, 2))
        text = text + torch.tanh(self.text_out(torch.cat(o_parts, -1)))
        visual = visual + torch.tanh(self.vis_out(torch.cat(p_parts, -1)))
        return visual, text
