"""An MDETR-style multi-instance head on VG-LAW's visual tokens: N object queries decode boxes, scores, soft
token predictions, contrastive-alignment embeddings and masks, so an expression may name several objects or
none (gRefCOCO).

Conditioning on the expression: the decoder's memory is the projected visual tokens (2D sin-cos positions added)
*and* the projected text tokens (padding masked), each with a type embedding, as MDETR's encoder output holds
both modalities; the visual tokens are already language-adapted by LAW, so there is no separate encoder.
The queries are learned embeddings (not initialised from the text). `select` (off in the paper configs): query
selection as in the two-stage DETRs (Deformable DETR's two-stage variant, DINO's mixed query selection): every
visual token gets a score against the expression (its projection dotted with the projected mean of the text
memory), trained to mark the tokens the targets cover (mdetr_losses' "select" term), and the Q best tokens' memory
entries (content + position) are added to the Q learned queries, so each query starts on a candidate object
instead of learning from scratch where objects are.

Per query: a box (cx, cy, w, h), by `box`: "mlp" regresses it from the decoder output, sigmoid(MLP(hs)) (MDETR;
the paper configs and the code default); "geometry" reads it from where the query looks (QueryGeometry): the
query's own attention map over the visual tokens gives a reference box from its moments
(finetune/heads.attention_geometry / reference_boxes, as the one-instance head's `lap_geometry`), corrected in
logit space by an MLP whose last layer starts at zero. Token logits = a dot product of the query with every
text token (padding at -1e4) plus one "no object" logit, so the score is 1 - p(no object) (MDETR's soft token
prediction with a position-free classifier); alignment embeddings (L2-normalised, `align_dim`) of queries and tokens for
the contrastive loss; mask logits = the dot product of a per-query embedding with the mask head's pixel
embeddings (finetune/heads.py ResHead.pixel_embeddings, 1/4 of the input).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from finetune.config import MDETR_BOXES
from finetune.heads import attention_geometry, reference_boxes

PAD_LOGIT = -1e4        # finite, so a zero target times it stays zero


def mlp(d_in: int, hidden: int, d_out: int, layers: int = 3) -> nn.Sequential:
    dims = [d_in] + [hidden] * (layers - 1)
    mods: list[nn.Module] = []
    for a, b in zip(dims, dims[1:]):
        mods += [nn.Linear(a, b), nn.ReLU(inplace=True)]
    return nn.Sequential(*mods, nn.Linear(dims[-1], d_out))


def sincos_2d(hw: tuple[int, int], dim: int, device=None, dtype=None) -> torch.Tensor:
    """Fixed 2D sin-cos positions [H*W, dim] of a token grid (row-major, like the visual tokens)."""
    from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

    return build_sincos2d_pos_embed(list(hw), dim=dim).to(device=device, dtype=dtype)


class QueryGeometry(nn.Module):
    """Per query, an attention map over the visual tokens (a key projection of the tokens, a query projection
    of the decoder output, softmax over the grid: LanguageAdaptivePooling with one query per object query) and
    the reference box of its moments, in logit space; MdetrHead adds its box MLP's output (last layer zeroed at
    init) to it, so training starts from the reference box and the box losses reach the map through its moments.

    The keys are the visual tokens as LAW leaves them, *before* the decoder's projection: that memory has the
    2D sin-cos positions added, with which a learned query could point at a fixed place whatever the image
    holds (the position prior that makes DETR's queries slow to converge). Without positions a map can only
    point at tokens whose content matches the query, as the LAP map does, and its moments say where they are;
    the box gradients also reach the backbone's tokens directly, as they do through the LAP map."""

    def __init__(self, vis_dim: int, dim: int) -> None:
        super().__init__()
        self.key = nn.Linear(vis_dim, dim)
        self.query = nn.Linear(dim, dim)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, visual: torch.Tensor, hw: tuple[int, int], hs: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """visual [B,N,C] on grid hw, decoder output hs [B,Q,D] -> logit(reference box) [B,Q,4] (float32),
        maps [B,Q,N] (each sums to 1)."""
        B, Q, _ = hs.shape
        logits = torch.einsum("bqd,bnd->bqn", self.query(hs), self.key(visual)) * self.scale
        attn = logits.float().softmax(-1)
        ref = reference_boxes(attention_geometry(attn.flatten(0, 1), hw), hw).view(B, Q, 4)
        return torch.special.logit(ref), attn.to(hs.dtype)


class MdetrHead(nn.Module):
    def __init__(self, vis_dim: int, text_dim: int, pix_dim: int, *, queries: int = 10, dim: int = 256,
                 depth: int = 3, heads: int = 8, align_dim: int = 64, box: str = "mlp", select: bool = False) -> None:
        super().__init__()
        if box not in MDETR_BOXES:
            raise ValueError(f"box must be one of {', '.join(MDETR_BOXES)}, got {box!r}")
        self.dim = dim
        self.vis_proj = nn.Linear(vis_dim, dim)
        self.text_proj = nn.Linear(text_dim, dim)
        self.type_embed = nn.Parameter(torch.zeros(2, dim))         # 0 visual token, 1 text token
        nn.init.normal_(self.type_embed, std=0.02)
        self.query_embed = nn.Embedding(queries, dim)
        layer = nn.TransformerDecoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, depth, norm=nn.LayerNorm(dim))
        self.box = mlp(dim, dim, 4)                                 # geometry: the correction, from zero
        if box == "geometry":
            nn.init.zeros_(self.box[-1].weight)
            nn.init.zeros_(self.box[-1].bias)
        self.token_query = nn.Linear(dim, dim)
        self.token_key = nn.Linear(dim, dim)
        self.no_object = nn.Linear(dim, 1)
        self.align_query = nn.Linear(dim, align_dim)
        self.align_token = nn.Linear(dim, align_dim)
        self.mask_embed = mlp(dim, dim, pix_dim)
        # built last, so the modules both boxes share draw the same initial weights (and mlp's are as before)
        self.geometry = QueryGeometry(vis_dim, dim) if box == "geometry" else None
        self.select_key = nn.Linear(dim, dim) if select else None
        self.select_query = nn.Linear(dim, dim) if select else None

    @property
    def queries(self) -> int:
        return self.query_embed.num_embeddings

    def token_scores(self, mem_v: torch.Tensor, mem_t: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """[B,N] logits: how much each visual token belongs to what the expression names (query selection)."""
        keep = (~pad).to(mem_t.dtype)[..., None]
        text = (mem_t * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        return torch.einsum("bnd,bd->bn", self.select_key(mem_v), self.select_query(text)) / math.sqrt(self.dim)

    def forward(self, visual: torch.Tensor, hw: tuple[int, int], text: torch.Tensor, text_mask: torch.Tensor,
                pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """visual [B,N,C] on grid hw, text [B,L,d_l] with text_mask [B,L], pixels [B,P,h,w] ->
        pred_boxes [B,Q,4], pred_logits [B,Q,L+1] (the last column is "no object"), query_align [B,Q,A],
        token_align [B,L,A] (both L2-normalised), pred_masks [B,Q,h,w] (logits); with box "geometry" also
        query_attn [B,Q,N], each query's map over the visual tokens; with `select` also token_scores [B,N] (logits)
        and selected [B,Q] (the tokens that started the queries, best first)."""
        B = visual.shape[0]
        pos = sincos_2d(hw, self.dim, visual.device, visual.dtype)
        mem_v = self.vis_proj(visual) + pos[None] + self.type_embed[0]
        mem_t = self.text_proj(text) + self.type_embed[1]
        pad = text_mask == 0
        memory = torch.cat([mem_v, mem_t], 1)
        key_pad = torch.cat([torch.zeros(B, mem_v.shape[1], dtype=torch.bool, device=pad.device), pad], 1)
        # repeat, not expand: a view of a parameter made under no_grad (the FLOP counter's pass) breaks module hooks
        tgt = self.query_embed.weight[None].repeat(B, 1, 1).to(memory.dtype)
        selected = {}
        if self.select_key is not None:
            scores = self.token_scores(mem_v, mem_t, pad)
            if scores.shape[1] < tgt.shape[1]:
                raise ValueError(f"query selection needs at least {tgt.shape[1]} visual tokens, got {scores.shape[1]}")
            idx = scores.detach().topk(tgt.shape[1], dim=1).indices                  # [B,Q], best first
            tgt = tgt + torch.gather(mem_v, 1, idx[..., None].expand(-1, -1, mem_v.shape[-1]))
            selected = {"token_scores": scores, "selected": idx}
        hs = self.decoder(tgt, memory, memory_key_padding_mask=key_pad)
        tok = torch.einsum("bqd,bld->bql", self.token_query(hs), self.token_key(mem_t)) / math.sqrt(self.dim)
        tok = tok.masked_fill(pad[:, None, :], PAD_LOGIT)
        logits = torch.cat([tok, self.no_object(hs)], -1)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(hs), pixels) / math.sqrt(pixels.shape[1])
        out = {"pred_logits": logits, "query_align": F.normalize(self.align_query(hs), dim=-1),
               "token_align": F.normalize(self.align_token(mem_t), dim=-1), "pred_masks": masks, **selected}
        if self.geometry is None:
            return {"pred_boxes": self.box(hs).sigmoid(), **out}
        ref, attn = self.geometry(visual, hw, hs)
        return {"pred_boxes": (ref + self.box(hs).float()).sigmoid().to(hs.dtype), "query_attn": attn, **out}


def query_scores(pred_logits: torch.Tensor) -> torch.Tensor:
    """[B,Q,L+1] -> [B,Q]: 1 - p(no object)."""
    return 1.0 - pred_logits.float().softmax(-1)[..., -1]
