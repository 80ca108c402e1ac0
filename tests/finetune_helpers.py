"""Tiny VG-LAW configurations and batches shared by the finetune tests (keep CPU time small)."""
from __future__ import annotations

import torch

from finetune.config import FinetuneConfig
from pretrain.config import from_dict

TINY = {
    "model": {
        "vision": {"name": "vit_tiny_patch16_224", "img_size": 64,
                   "timm_kwargs": {"embed_dim": 48, "depth": 4, "num_heads": 4}},
        "text": {"vocab_size": 120, "hidden_size": 48, "num_layers": 3, "num_heads": 4,
                 "intermediate_size": 96, "text_layers": 2, "max_len": 8},
        "window_size": 2, "global_blocks": [1, 3], "law_groups": 12, "law_reduction": 4, "law_rank": 8,
        "lap_dim": 16, "head_hidden": 32, "res_hidden": 16,
        "mask_grounding": {"dim": 32, "heads": 4, "depth": 1},
    },
    "data": {"image_size": 64, "max_len": 8, "batch_size": 4, "num_workers": 0},
    "engine": {"deepspeed": False, "precision": "fp32"},
}


def tiny_config(**overrides) -> FinetuneConfig:
    import copy
    data = copy.deepcopy(TINY)
    for key, value in overrides.items():
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = copy.deepcopy(value)      # a later "a.b.c" key must not write into the caller's dict
    return from_dict(FinetuneConfig, data)


def tiny_batch(n: int = 4, size: int = 64, length: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch in the grounding batch contract: random images, expressions, one box + its mask each."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (n, length), generator=g)
    ids[:, 0] = 101 % 120
    lengths = torch.randint(4, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = ids * mask
    boxes = torch.rand(n, 4, generator=g) * 0.4 + torch.tensor([0.3, 0.3, 0.2, 0.2])
    masks = torch.zeros(n, size, size)
    for i, (cx, cy, w, h) in enumerate(boxes.tolist()):
        x0, x1 = int((cx - w / 2) * size), int((cx + w / 2) * size)
        y0, y1 = int((cy - h / 2) * size), int((cy + h / 2) * size)
        masks[i, y0:y1, x0:x1] = 1
    return {"image": torch.randn(n, 3, size, size, generator=g), "text_ids": ids, "text_mask": mask,
            "bbox": boxes, "mask": masks}


def overfit(task, batch: dict[str, torch.Tensor], steps: int, lr: float) -> list[dict[str, torch.Tensor]]:
    """`steps` AdamW steps of `task` on one fixed batch; returns every step's loss terms (detached)."""
    opt = torch.optim.AdamW(task.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        out = task(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append({k: v.detach() if torch.is_tensor(v) else v for k, v in out.items()})
    return history
