"""ViTDet-style language-adaptive ViT: a timm ViT run at high resolution with windowed attention.

The timm model is used as it is (its parameters, names and submodules); only the block loop is ours, because
(a) most blocks attend inside non-overlapping windows (ViTDet; window 14 = a 2x2 grid at 448 px with /16
patches) and a few are global (2, 5, 8, 11 by default), and (b) each block's qkv goes through the language
adaptive weights. As in ViTDet the class token is dropped and the absolute position embeddings are resampled
to the input grid (a checkpoint from 224 px meets 448 px here).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from finetune.law import LanguageAdaptiveWeights


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """[B,H,W,C] -> [B*nw, window*window, C], zero-padding H and W up to multiples of `window`."""
    B, H, W, C = x.shape
    ph, pw = (-H) % window, (-W) % window
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    Hp, Wp = H + ph, W + pw
    x = x.view(B, Hp // window, window, Wp // window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, C), (Hp, Wp)


def window_unpartition(x: torch.Tensor, window: int, padded: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of `window_partition`: [B*nw, window*window, C] -> [B,H,W,C] (padding cropped)."""
    Hp, Wp = padded
    C = x.shape[-1]
    B = x.shape[0] // ((Hp // window) * (Wp // window))
    x = x.view(B, Hp // window, Wp // window, window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, Hp, Wp, C)[:, : hw[0], : hw[1]]


class LawViT(nn.Module):
    """timm ViT + language adaptive qkv weights + ViTDet windowing. Output: patch tokens [B,N,C], grid (H,W)."""

    def __init__(self, vit: nn.Module, text_dim: int, *, window_size: int = 14,
                 global_blocks: Sequence[int] = (2, 5, 8, 11), law: bool = True,
                 groups: int = 12, reduction: int = 16, rank: int = 32, init_std: float = 0.0) -> None:
        super().__init__()
        blocks = list(vit.blocks)
        for i, blk in enumerate(blocks):
            if not hasattr(blk, "attn") or not hasattr(blk.attn, "qkv"):
                raise ValueError(f"block {i} of {type(vit).__name__} has no attn.qkv: not a plain timm ViT")
        bad = [i for i in global_blocks if not 0 <= i < len(blocks)]
        if bad:
            raise ValueError(f"global_blocks {bad} out of range for a {len(blocks)}-block ViT")
        self.vit = vit
        self.window_size = window_size
        self.global_blocks = frozenset(int(i) for i in global_blocks)
        dim = vit.embed_dim
        qkv_out = blocks[0].attn.qkv.out_features
        self.grad_checkpointing = False
        self.law = (LanguageAdaptiveWeights(len(blocks), text_dim, dim, qkv_out, groups=groups,
                                            reduction=reduction, rank=rank, init_std=init_std) if law else None)

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    def tap_stem(self, strides: Sequence[int]) -> list[int]:
        """Keep the conv stem's feature maps at these strides from every pass (forward hooks; `stem_maps` holds the
        latest pass's, in this order) for the mask head's skip connections. Returns their widths. ValueError when
        the ViT has no conv stem or the stem has no map at a stride."""
        from pretrain.encoders import conv_stem_maps

        maps = conv_stem_maps(self.vit)
        missing = [s for s in strides if s not in maps]
        if missing:
            raise ValueError(f"no conv stem map at stride {missing[0]}: "
                             + (f"this stem has maps at strides {sorted(maps)}" if maps else "the ViT has no conv stem"))
        self.stem_maps: list[torch.Tensor | None] = [None] * len(strides)

        def keep(i: int):
            def hook(_module, _inputs, output):
                self.stem_maps[i] = output
            return hook

        for i, s in enumerate(strides):
            maps[s][0].register_forward_hook(keep(i))
        return [maps[s][1] for s in strides]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def is_windowed(self, i: int) -> bool:
        return self.window_size > 0 and i not in self.global_blocks

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch embedding + resampled absolute position embedding (no class token)."""
        vit = self.vit
        x = vit.patch_embed(images)
        if x.ndim == 4:                         # dynamic_img_size models return NHWC
            x = x.flatten(1, 2)
        H, W = vit.patch_embed.dynamic_feat_size(tuple(images.shape[-2:]))    # patchify or a conv stem
        if vit.pos_embed is not None:
            prefix = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
            pos = vit.pos_embed[:, prefix:]
            pos = resample_abs_pos_embed(pos, new_size=(H, W), old_size=vit.patch_embed.grid_size, num_prefix_tokens=0)
            x = x + pos.to(x.dtype)
        x = vit.pos_drop(x)
        x = vit.norm_pre(x)
        return x, (H, W)

    def _attention(self, blk: nn.Module, x: torch.Tensor, hw: tuple[int, int], windowed: bool,
                   phi: torch.Tensor | None) -> torch.Tensor:
        attn = blk.attn
        B, N, _ = x.shape
        qkv = self.law.project(x, attn.qkv, phi) if self.law is not None else attn.qkv(x)
        mask = None
        if windowed:                            # qkv is token-wise, so it commutes with partitioning
            qkv_hw = qkv.view(B, hw[0], hw[1], -1)
            qkv, padded = window_partition(qkv_hw, self.window_size)
            if padded != hw:                    # padded tokens are keys nobody should see
                valid = torch.zeros(B, padded[0], padded[1], 1, dtype=qkv.dtype, device=qkv.device)
                valid[:, : hw[0], : hw[1]] = 1
                mask = window_partition(valid, self.window_size)[0][..., 0].bool()[:, None, None, :]
        b, n, _ = qkv.shape
        q, k, v = qkv.view(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=attn.attn_drop.p if self.training else 0.0)
        out = out.transpose(1, 2).reshape(b, n, -1)
        if windowed:
            out = window_unpartition(out, self.window_size, padded, hw).reshape(B, N, -1)
        out = attn.norm(out)
        return attn.proj_drop(attn.proj(out))

    def forward(self, images: torch.Tensor, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, taps: list[int] | None = None,
                out: dict | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """images [B,3,S,S]; text features [B,L,d_l] + mask (required when LAW is on) -> tokens, grid.
        `taps`: block indices whose output tokens are stored in `out[i]` (AttBalance's per-layer maps)."""
        x, hw = self.embed(images)
        phi = None
        if self.law is not None:
            if text is None or text_mask is None:
                raise ValueError("LawViT with language adaptive weights needs text features and mask")
            phi = self.law(text, text_mask)
        for i, blk in enumerate(self.vit.blocks):
            p = phi[:, i] if phi is not None else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(self._block, blk, x, hw, self.is_windowed(i), p,
                                                      use_reentrant=False)
            else:
                x = self._block(blk, x, hw, self.is_windowed(i), p)
            if taps and i in taps:
                out[i] = x
        return self.vit.norm(x), hw

    def _block(self, blk: nn.Module, x: torch.Tensor, hw: tuple[int, int], windowed: bool,
               phi: torch.Tensor | None) -> torch.Tensor:
        x = x + blk.drop_path1(blk.ls1(self._attention(blk, blk.norm1(x), hw, windowed, phi)))
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
