"""AttBalance's difficulty adaptive training (DAT): per-sample weights on the box losses
(../shared/METHODS.md §5; AttBalance eqs. 3-5):

    W_adw = 0.5 + sigmoid(L_ar)                       actual difficulty: the sample's attention regularisation loss
    W_odw = 0.5 + 1 / (1 + exp(boxRatio - 1))         objective difficulty: boxRatio = box area / image area
    L     = alpha_ar * L_ar + W_odw * W_adw * (alpha_1 * L1 + alpha_g * GIoU)

L_ar is the sample's attention regularisation, RAC + MRC (the unweighted sum of whichever are on; 0 when neither
is, so W_adw = 1). The weights are detached: they scale the box losses' gradient, they are not trained through.
The image is the model's input frame (letterboxed), so boxRatio = w * h of the normalised target box.
"""
from __future__ import annotations

import torch


def dat_weights(attn_reg: torch.Tensor | None, boxes: torch.Tensor) -> torch.Tensor:
    """attn_reg [B] (L_ar per sample, or None), target boxes [B,4] normalised cxcywh -> W_odw * W_adw [B]."""
    b = boxes.detach().float()
    ratio = b[:, 2] * b[:, 3]
    w_odw = 0.5 + 1.0 / (1.0 + torch.exp(ratio - 1.0))
    w_adw = 0.5 + torch.sigmoid(attn_reg.detach().float()) if attn_reg is not None else torch.ones_like(ratio)
    return w_odw * w_adw

