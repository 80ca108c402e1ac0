"""MagNet's cross-modal alignment loss (CAL) on the RES head's pixel embeddings (../shared/METHODS.md §3;
MagNet, CVPR 2024, eq. for L_CAL), per sample, with every feature L2-normalised before the dot products:

    L_CAL = L_P2P + L_P2T
    L_P2P = -1/|P| sum_i log( e^{I+_i.I+avg/t1} / (e^{I+_i.I+avg/t1} + sum_j e^{I+_i.I-_j/t1}) )
            -1/|N| sum_j log( e^{I-_j.I-avg/t1} / (e^{I-_j.I-avg/t1} + sum_i e^{I-_j.I+_i/t1}) )
    L_P2T = -1/|P| sum_i log( e^{I+_i.Tavg/t2} / (e^{I+_i.Tavg/t2} + sum_j e^{I+_i.I-_j/t2}) )

I+ / I- are the pixel embeddings inside / outside the ground-truth mask (the mask area-resized to the
embedding grid, a pixel positive when more than half of it is object), I+avg / I-avg their means, and
Tavg = proj(mean of the expression's token features, padding excluded). The reading notes print the fractions
without the log; InfoNCE, which the paper names, has it, so it is used here. The paper does not say how many
pixels enter the sums; with P x N similarities per sample (12,544 pixels at 448 px) all of them would cost
more than the model, so `cal_pixels` of each class are drawn at random per sample (0 = all). A sample
without object or without background pixels contributes nothing; the loss averages the other samples.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _draw(member: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """member [B, n] bool -> indices [B, k'] of up to k random members per row, and which of them are members.
    k' = min(k, the most members any row has): columns past it would hold non-members only (masked out of every
    sum), so the loss is the same and its [B, K, K] similarities shrink to the object's size (an object covers
    about a tenth of the demo's 32x32 pixel grid: 0.84 -> 0.6 s a demo step on one CPU thread)."""
    score = torch.rand(member.shape, device=member.device).masked_fill(~member, -1.0)
    k = max(1, min(k, int(member.sum(1).max())))
    idx = score.topk(k, dim=1).indices
    return idx, member.gather(1, idx)


def _info_nce(anchor_logit: torch.Tensor, others: torch.Tensor, others_valid: torch.Tensor) -> torch.Tensor:
    """-log(e^a / (e^a + sum_j e^o_j)) over valid j: anchor_logit [B,K], others [B,K,J], valid [B,J] -> [B,K]."""
    others = others.masked_fill(~others_valid[:, None, :], float("-inf"))
    return torch.logsumexp(torch.cat([anchor_logit[..., None], others], -1), -1) - anchor_logit


def _masked_mean(v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """mean over the valid entries of each row: v, valid [B,K] -> [B] (0 for a row with none)."""
    w = valid.to(v.dtype)
    return (v * w).sum(1) / w.sum(1).clamp(min=1.0)


def cal_terms(pixels: torch.Tensor, positive: torch.Tensor, text: torch.Tensor, tau_pixel: float,
              tau_text: float, max_pixels: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pixels [B, n, C] (any scale), positive [B, n] bool, text [B, C] (Tavg, already projected)
    -> (L_P2P [B], L_P2T [B], sample valid [B])."""
    f = F.normalize(pixels.float(), dim=-1)
    n = f.shape[1]
    k = n if max_pixels <= 0 else min(max_pixels, n)
    ip, vp = _draw(positive, k)
    in_, vn = _draw(~positive, k)
    P = f.gather(1, ip[..., None].expand(-1, -1, f.shape[-1]))
    N = f.gather(1, in_[..., None].expand(-1, -1, f.shape[-1]))
    avg_p = F.normalize((P * vp[..., None]).sum(1), dim=-1)
    avg_n = F.normalize((N * vn[..., None]).sum(1), dim=-1)
    t = F.normalize(text.float(), dim=-1)
    sim_pn = P @ N.transpose(1, 2)                                   # [B, K, K] I+_i . I-_j
    pos = _info_nce((P * avg_p[:, None]).sum(-1) / tau_pixel, sim_pn / tau_pixel, vn)
    neg = _info_nce((N * avg_n[:, None]).sum(-1) / tau_pixel, sim_pn.transpose(1, 2) / tau_pixel, vp)
    p2t = _info_nce((P * t[:, None]).sum(-1) / tau_text, sim_pn / tau_text, vn)
    valid = vp.any(1) & vn.any(1)
    return _masked_mean(pos, vp) + _masked_mean(neg, vn), _masked_mean(p2t, vp), valid


class CrossModalAlignmentLoss(nn.Module):
    """L_CAL on the RES head's pixel embeddings [B, C, h, w] against the ground-truth mask [B, S, S] and the
    expression's token features [B, L, d_l]; owns Tavg's projection d_l -> C."""

    def __init__(self, text_dim: int, pixel_dim: int, tau_pixel: float = 0.07, tau_text: float = 0.07,
                 max_pixels: int = 512) -> None:
        super().__init__()
        self.text_proj = nn.Linear(text_dim, pixel_dim)
        self.tau_pixel, self.tau_text, self.max_pixels = tau_pixel, tau_text, max_pixels

    def forward(self, pixel_emb: torch.Tensor, mask: torch.Tensor, text: torch.Tensor,
                text_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """-> {"cal", "cal_p2p", "cal_p2t"}, means over the samples that have object and background pixels."""
        B, C, h, w = pixel_emb.shape
        positive = F.interpolate(mask.float()[:, None], size=(h, w), mode="area")[:, 0].flatten(1) > 0.5
        m = text_mask.to(text.dtype)[..., None]
        t_avg = self.text_proj((text * m).sum(1) / m.sum(1).clamp(min=1.0))
        p2p, p2t, valid = cal_terms(pixel_emb.flatten(2).transpose(1, 2), positive, t_avg, self.tau_pixel,
                                    self.tau_text, self.max_pixels)
        n = valid.float().sum().clamp(min=1.0)
        p2p = (p2p * valid).sum() / n
        p2t = (p2t * valid).sum() / n
        return {"cal": p2p + p2t, "cal_p2p": p2p.detach(), "cal_p2t": p2t.detach()}
