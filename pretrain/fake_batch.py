"""Random batches in the pretraining batch contract (shards/stream.py's output), for benchmarks and tests."""
from __future__ import annotations

import torch
from torch import Tensor


def random_batch(batch: int, img_size: int, text_len: int, vocab_size: int, region_images: int = 0,
                 region_texts: int = 0, masks_per_text: int = 4, device: str | torch.device = "cpu",
                 generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """A batch with the contract's keys, shapes and dtypes: random pixels and token ids, texts padded to
    random lengths (>= 4 real tokens), `masks_per_text` MLM positions per text, boxes inside the image."""
    g = generator

    def texts(n: int) -> dict[str, Tensor]:
        ids = torch.randint(5, vocab_size, (n, text_len), generator=g)
        lengths = torch.randint(min(4, text_len), text_len + 1, (n,), generator=g)
        mask = (torch.arange(text_len)[None] < lengths[:, None]).long()
        ids = ids * mask
        labels = torch.full_like(ids, -100)
        mlm_ids = ids.clone()
        for i in range(n):   # test/bench input only: masks within the real tokens, never at [CLS]
            real = int(lengths[i])
            k = min(masks_per_text, real - 1)
            pos = 1 + torch.randperm(real - 1, generator=g)[:k]
            labels[i, pos] = ids[i, pos]
            mlm_ids[i, pos] = 3
        return {"ids": ids, "mask": mask, "mlm_ids": mlm_ids, "mlm_labels": labels}

    t = texts(batch)
    out = {"image": torch.randn(batch, 3, img_size, img_size, generator=g), "text_ids": t["ids"],
           "text_mask": t["mask"], "mlm_ids": t["mlm_ids"], "mlm_labels": t["mlm_labels"]}
    if region_texts:
        r = texts(region_texts)
        wh = 0.1 + 0.8 * torch.rand(region_texts, 2, generator=g)
        c = wh / 2 + (1 - wh) * torch.rand(region_texts, 2, generator=g)
        out.update({
            "region_image": torch.randn(region_images, 3, img_size, img_size, generator=g),
            "region_image_idx": torch.arange(region_texts) % region_images,
            "region_bbox": torch.cat([c, wh], dim=1),
            "region_text_ids": r["ids"], "region_text_mask": r["mask"],
            "region_mlm_ids": r["mlm_ids"], "region_mlm_labels": r["mlm_labels"],
            "region_repeats": torch.tensor(1),
        })
    return {k: v.to(device) for k, v in out.items()}
