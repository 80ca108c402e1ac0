"""`PretrainTask`: X-VLM as one module whose forward(batch) returns the weighted losses of a step.

One optimiser step per iteration on `L = L_image + region_weight * L_region` (X^2-VLM's mixed batch). The
image level has ITC + ITM + MLM on (image, caption); the region level has ITC + ITM + MLM on (visual concept,
region text) plus the box loss on (whole image, region text). Encoder calls are batched: one vision pass over
images and region images, one text pass over every text, one fusion pass per level.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shards.augment import normalize

from .concepts import concept_tokens
from .config import ConfigError, PretrainConfig
from .encoders import build_text_encoder, build_vision_encoder, read_bert_state_dict, token_grid, vision_tokens
from .fusion import build_fusion_encoder
from .gather import rank_and_world
from .heads import MLMHead, build_mlp_head
from .box_ops import box_cxcywh_to_xyxy, elementwise_iou
from .losses import (box_losses, itc_loss, itm_loss, mlm_loss, same_text, sample_hard_negatives,
                     select_masked_positions, weighted_mean)

LOSS_NAMES = ("itc", "itm", "mlm", "bbox", "giou")
TEMP_RANGE = (0.001, 0.5)
IMAGE_KEYS = ("image", "text_ids", "text_mask", "mlm_ids", "mlm_labels")
REGION_KEYS = ("region_image", "region_image_idx", "region_bbox", "region_text_ids", "region_text_mask",
               "region_mlm_ids", "region_mlm_labels")


class PretrainTask(nn.Module):
    """Submodules: `vision` (timm), `text` (TextEncoder), `fusion` (FusionEncoder) and the heads
    `vision_proj`, `text_proj`, `itm_head`, `bbox_head`, `mlm_head`, plus the ITC temperature `temp` ([1])."""

    def __init__(self, cfg: PretrainConfig, vocab_size: int | None = None):
        super().__init__()
        m = cfg.model
        unknown = sorted(set(cfg.loss.weights) - set(LOSS_NAMES))
        if unknown:
            raise ConfigError(f"loss.weights: unknown loss '{unknown[0]}' (known: {', '.join(LOSS_NAMES)})")
        self.weights = {k: float(cfg.loss.weights.get(k, 1.0)) for k in LOSS_NAMES}
        self.region_weight = float(cfg.loss.region_weight)
        self.exclude_duplicates = bool(cfg.loss.exclude_duplicates)
        self.mlm_positions = max(1, 2 * cfg.data.max_masks)   # scored positions per text (see losses)
        self.head_lr_mult = float(cfg.optim.head_lr_mult)

        self.vision = build_vision_encoder(m.vision, grad_checkpointing=m.grad_checkpointing)
        vision_dim = self.vision.num_features
        bert_sd = read_bert_state_dict(m.text.bert) if m.text.bert else None
        self.text = build_text_encoder(m.text, vocab_size, bert_state_dict=bert_sd)
        self.fusion = build_fusion_encoder(m.text, vision_dim, vocab_size, bert_state_dict=bert_sd)
        if m.grad_checkpointing:
            self.text.set_grad_checkpointing(True)
            self.fusion.set_grad_checkpointing(True)
        d = self.text.config.hidden_size
        self.vision_proj = nn.Linear(vision_dim, m.embed_dim)
        self.text_proj = nn.Linear(d, m.embed_dim)
        self.temp = nn.Parameter(torch.full([1], float(m.temp)))  # shape [1]: 0-dim params crash DeepSpeed
        self.itm_head = build_mlp_head(d, 2)
        self.bbox_head = build_mlp_head(d, 4)
        self.mlm_head = MLMHead(self.text.config)
        self.mlm_head_pretrained = bool(bert_sd) and self.mlm_head.load_bert_head(bert_sd)
        self.cfg = cfg

    # ------------------------------------------------------------------------------------------
    def lr_multipliers(self) -> dict[str, float]:
        """Parameter-name prefix -> lr multiplier: newly initialised heads and cross-attention get
        optim.head_lr_mult (X-VLM's `init_params`); everything else (and an MLM head loaded from the BERT
        checkpoint) 1.0."""
        mult = self.head_lr_mult
        heads = ["vision_proj", "text_proj", "itm_head", "bbox_head"] + ([] if self.mlm_head_pretrained else ["mlm_head"])
        out = {name: mult for name in heads}
        for i in range(len(self.fusion.layer)):
            out[f"fusion.layer.{i}.crossattention"] = mult
        return out

    def flops_per_sample(self, text_len: int | None = None, with_regions: bool | None = None) -> float:
        """Analytic FLOPs of forward + backward of one step, per image-text sample (see pretrain/flops.py), at
        the loader's text length (data.max_tokens, else data.max_words + 2) and region sub-batch sizes."""
        from .flops import step_flops
        d = self.cfg.data
        if text_len is None:
            text_len = d.max_tokens or d.max_words + 2
        if with_regions is None:
            with_regions = d.region_texts > 0
        total = step_flops(self, batch=d.batch_size, text_len=text_len,
                           region_images=d.region_images if with_regions else 0,
                           region_texts=d.region_texts if with_regions else 0)
        return 3.0 * total / d.batch_size

    # ------------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        missing = [k for k in IMAGE_KEYS if k not in batch]
        if missing:
            raise KeyError(f"pretraining batch lacks {missing}")
        has_region = "region_image" in batch
        b = batch["image"].shape[0]

        images = torch.cat([batch["image"], batch["region_image"]]) if has_region else batch["image"]
        if images.dtype == torch.uint8:         # data.normalize_in_loader=false: normalise here, on the device
            d = self.cfg.data
            images = normalize(images, d.mean, d.std).to(next(self.vision.parameters()).dtype)
        vis = vision_tokens(self.vision, images)
        grid = token_grid(vis.shape[1] - 1)

        ids = [batch["text_ids"], batch["mlm_ids"]]
        masks = [batch["text_mask"], batch["text_mask"]]
        if has_region:
            ids += [batch["region_text_ids"], batch["region_mlm_ids"]]
            masks += [batch["region_text_mask"], batch["region_text_mask"]]
        states = self._encode_texts(ids, masks)

        out: dict[str, Tensor] = {}
        image_terms = self._level(vis[:b], None, batch["text_ids"], states[0], batch["text_mask"], states[1],
                                  batch["mlm_labels"])
        loss = self._weighted(image_terms)
        out.update(image_terms)
        if has_region:
            region_vis, idx = vis[b:], batch["region_image_idx"]
            tokens, key_mask = concept_tokens(region_vis, idx, batch["region_bbox"], grid)
            region_terms = self._level(tokens, key_mask, batch["region_text_ids"], states[2], batch["region_text_mask"],
                                       states[3], batch["region_mlm_labels"], box_tokens=region_vis, box_index=idx,
                                       box_target=batch["region_bbox"], valid=region_valid(batch))
            loss = loss + self.region_weight * self._weighted(region_terms)
            out.update({f"region_{k}" if k not in ("bbox", "giou") else k: v for k, v in region_terms.items()})
        out = {k: v.detach() for k, v in out.items()}
        out["temp"] = self.temp.detach().clamp(*TEMP_RANGE).squeeze(0)
        out["loss"] = loss
        return out

    def _encode_texts(self, ids: list[Tensor], masks: list[Tensor]) -> list[Tensor]:
        """One text-encoder pass when all texts share a length, else one per group."""
        if len({t.shape[1] for t in ids}) == 1:
            h = self.text(torch.cat(ids), torch.cat(masks))
            return list(h.split([t.shape[0] for t in ids]))
        return [self.text(i, m) for i, m in zip(ids, masks)]

    def _weighted(self, terms: dict[str, Tensor]) -> Tensor:
        return sum(self.weights[k] * v for k, v in terms.items() if k in self.weights)

    def _level(self, vis: Tensor, vis_mask: Tensor | None, text_ids: Tensor, text: Tensor, text_mask: Tensor,
               mlm_text: Tensor, mlm_labels: Tensor, box_tokens: Tensor | None = None, box_index: Tensor | None = None,
               box_target: Tensor | None = None, valid: Tensor | None = None) -> dict[str, Tensor]:
        """ITC + ITM + MLM (+ box) for one granularity; vis [B, 1+N, Dv] with its key mask (None = all);
        the box loss attends text i to box_tokens[box_index[i]] (whole images, all tokens). `valid` [B] marks
        real pairs (None = all), the others are padding repeats left out of the losses."""
        n = vis.shape[0]
        temp = self.temp.clamp(*TEMP_RANGE)
        image_feat = F.normalize(self.vision_proj(vis[:, 0]).float(), dim=-1)
        text_feat = F.normalize(self.text_proj(text[:, 0]).float(), dim=-1)
        duplicate = same_text(text_ids) if self.exclude_duplicates else None      # [n, world * n]
        itc, logits_i2t, logits_t2i = itc_loss(image_feat, text_feat, temp, valid, duplicate)

        own = None
        if duplicate is not None:                                  # this rank's columns, as the logits returned
            rank = rank_and_world()[0]
            own = duplicate[:, rank * n:(rank + 1) * n]
        neg_image, ok_image = sample_hard_negatives(logits_t2i, valid, own)   # for each text, a hard negative image
        neg_text, ok_text = sample_hard_negatives(logits_i2t, valid, own)     # for each image, a hard negative text

        itm_weight = None
        if valid is not None:
            itm_weight = torch.cat([valid, valid & ok_image, valid & ok_text])
        # one fusion pass: [positives | text + neg image | neg text + image | MLM | (box)]; the visual side is
        # given once per distinct token set plus an index per sequence (keys/values projected once)
        arange = torch.arange(n, device=vis.device)
        f_text = [text, text, text[neg_text], mlm_text]
        f_tmask = [text_mask, text_mask, text_mask[neg_text], text_mask]
        f_index = [arange, neg_image, arange, arange]
        f_vis = [vis]
        f_vmask = None if vis_mask is None else [vis_mask, vis_mask[neg_image], vis_mask, vis_mask]
        if box_tokens is not None:
            f_text.append(text)
            f_tmask.append(text_mask)
            f_vis.append(box_tokens)
            f_index.append(n + box_index)
            if f_vmask is not None:
                f_vmask.append(torch.ones(n, box_tokens.shape[1], dtype=vis_mask.dtype, device=vis_mask.device))
        fused = self.fusion(torch.cat(f_text), torch.cat(f_tmask), torch.cat(f_vis),
                            None if f_vmask is None else torch.cat(f_vmask), torch.cat(f_index))

        itm, itm_acc = itm_loss(self.itm_head(fused[:3 * n, 0]), n, itm_weight)
        pos, labels, overflow = select_masked_positions(mlm_labels, self.mlm_positions)
        h = fused[3 * n:4 * n].gather(1, pos.unsqueeze(-1).expand(-1, -1, fused.shape[-1]))
        mlm, mlm_acc = mlm_loss(self.mlm_head(h, self.text.embeddings.word_embeddings.weight), labels)
        terms = {"itc": itc, "itm": itm, "mlm": mlm, "itm_acc": itm_acc, "mlm_acc": mlm_acc,
                 "mlm_overflow": overflow, "itc_r1": itc_recall_at_1(logits_i2t, valid)}
        if box_tokens is not None:
            pred = self.bbox_head(fused[4 * n:, 0]).float().sigmoid()
            terms["bbox"], terms["giou"] = box_losses(pred, box_target, valid)
            iou = elementwise_iou(box_cxcywh_to_xyxy(pred.detach()), box_cxcywh_to_xyxy(box_target.float()))
            terms["box_iou"] = weighted_mean(iou, valid)
        return terms


def itc_recall_at_1(logits_i2t: Tensor, valid: Tensor | None = None) -> Tensor:
    """Image->text R@1 within the local batch (chance 1/B): the fraction of (valid) images whose most similar
    (valid) text is their own. Logged beside the losses; no host sync."""
    n = logits_i2t.shape[0]
    logits = logits_i2t.float()
    if valid is not None:
        logits = logits.masked_fill(~valid.bool()[None, :], float("-inf"))
    hit = (logits.argmax(dim=1) == torch.arange(n, device=logits.device)).float()
    return weighted_mean(hit, valid)


def region_valid(batch: dict[str, Tensor]) -> Tensor:
    """[R] bool: the real region texts; the loader fills R by repeating texts and puts the
    `region_repeats` copies last (shards/stream.py)."""
    r = batch["region_text_ids"].shape[0]
    repeats = batch.get("region_repeats")
    idx = torch.arange(r, device=batch["region_text_ids"].device)
    if repeats is None:
        return torch.ones_like(idx, dtype=torch.bool)
    return idx < (r - repeats.to(idx.device))


def build_task(cfg: PretrainConfig, tokenizer_vocab_size: int | None = None) -> PretrainTask:
    """The X-VLM pretraining task for `cfg`; `tokenizer_vocab_size` overrides the BERT vocabulary size."""
    return PretrainTask(cfg, tokenizer_vocab_size)
