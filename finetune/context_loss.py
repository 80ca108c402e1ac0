"""The context mask loss: every other object of the image, named by its own expression, on the pixel
embeddings of the item's backbone pass (data.context_refs + loss.context; shards/context.py loads them).

VG-LAW's mask is the dot product of the pixel embeddings with the projected expression vector
(finetune.heads.ResHead.logits). One training item supervises that product for one object; the image's other
refs name its other objects. Their expressions go through the text encoder (the backbone pass is not
repeated: the pixels are the item's, conditioned on the item's expression), and each gives mask logits
against its own object's mask, scored with the item's focal + dice loss. This asks the pixel embeddings of
every named object, not only the target's, to match their expression, which is what binds words such as a
shape's name to what the backbone sees. Not in VG-LAW or MagNet: an option for small training budgets.
"""
from __future__ import annotations

import torch

from finetune.losses import dice_loss, focal_loss
from finetune.model import VGLaw


def context_mask_loss(model: VGLaw, pixel_emb: torch.Tensor, batch: dict[str, torch.Tensor], *, focal: float,
                      dice: float, focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> torch.Tensor:
    """focal * L_focal + dice * L_dice over the batch's valid context expressions (0 with grad when none).

    pixel_emb [B,C,h,w]; batch: context_ids / context_text_mask [B,K,L], context_masks [B,K,S,S],
    context_valid [B,K]."""
    b, k = batch["context_valid"].nonzero(as_tuple=True)
    if b.numel() == 0:
        return pixel_emb.sum() * 0.0
    ids, tmask = batch["context_ids"][b, k], batch["context_text_mask"][b, k]
    text = model.encode_text(ids, tmask)
    target = batch["context_masks"][b, k].float()
    logits = model.res_head.logits(pixel_emb[b], model.pool_text(text, tmask), tuple(target.shape[-2:]))
    return focal * focal_loss(logits, target, focal_alpha, focal_gamma) + dice * dice_loss(logits, target)
