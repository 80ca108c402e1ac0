"""The context loss: every other object of the image, named by its own expression, scored on the outputs of
the item's backbone pass (data.context_refs + loss.context; shards/context.py loads them).

VG-LAW's mask is the dot product of the pixel embeddings with the projected expression vector
(finetune.heads.ResHead.logits), and its box is the LAP head's reading of the visual tokens under that vector.
One training item supervises both for one object; the image's other refs name its other objects. Their
expressions go through the text encoder (the backbone pass is not repeated: the tokens and pixels are the
item's, conditioned on the item's expression), and each gives mask logits and a box for its own object, scored
with the item's focal + dice (and, with `loss.context_box`, L1 + GIoU) at the item's weights. This asks the
pixel embeddings of every named object, not only the target's, to match their expression, which is what binds
the words to what the backbone sees. Not in VG-LAW or MagNet: an option for small training budgets.
"""
from __future__ import annotations

import torch

from finetune.losses import box_losses_per_sample, dice_loss, focal_loss
from finetune.model import VGLaw


def context_losses(model: VGLaw, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], *, focal: float,
                   dice: float, l1: float = 0.0, giou: float = 0.0, focal_alpha: float = 0.25,
                   focal_gamma: float = 2.0) -> dict[str, torch.Tensor]:
    """{"context": focal * L_focal + dice * L_dice [+ l1 * L1 + giou * GIoU], "context_mask", "context_box"}
    over the batch's valid context expressions (0 with grad when there are none). The box part is computed when
    l1 or giou is > 0 and the model has the one-instance box head.

    out: the model's outputs on the batch ("pixel_emb" [B,C,h,w], "visual" [B,N,C], "grid"); batch:
    context_ids / context_text_mask [B,K,L], context_masks [B,K,S,S], context_boxes [B,K,4], context_valid [B,K]."""
    pixel_emb = out["pixel_emb"]
    b, k = batch["context_valid"].nonzero(as_tuple=True)
    if b.numel() == 0:
        zero = pixel_emb.sum() * 0.0
        return {"context": zero, "context_mask": zero.detach(), "context_box": zero.detach()}
    ids, tmask = batch["context_ids"][b, k], batch["context_text_mask"][b, k]
    cls = model.pool_text(model.encode_text(ids, tmask), tmask)
    target = batch["context_masks"][b, k].float()
    logits = model.res_head.logits(pixel_emb[b], cls, tuple(target.shape[-2:]))
    mask_term = focal * focal_loss(logits, target, focal_alpha, focal_gamma) + dice * dice_loss(logits, target)
    box_term = torch.zeros((), device=mask_term.device, dtype=mask_term.dtype)
    if (l1 > 0 or giou > 0) and model.rec_head is not None:
        boxes, _ = model.rec_head(out["visual"][b], cls, out["grid"])
        pl1, pgiou = box_losses_per_sample(boxes, batch["context_boxes"][b, k])
        box_term = l1 * pl1.mean() + giou * pgiou.mean()
    return {"context": mask_term + box_term, "context_mask": mask_term.detach(), "context_box": box_term.detach()}
