"""model.res_skip: the mask head's skip connections from the conv stem's stride-8 and stride-4 maps."""
import pytest
import torch

from finetune.config import ConfigError
from finetune.task import build_task
from finetune_helpers import tiny_batch, tiny_config

STEM = {"model.vision.conv_stem": [12, 24, 36, 48], "model.vision.conv_stem_add": True}


def test_skips_start_at_zero_and_then_train_the_stem():
    torch.manual_seed(0)
    plain = build_task(tiny_config(**STEM))
    torch.manual_seed(0)
    skip = build_task(tiny_config(**STEM, **{"model.res_skip": True}))
    extra = set(skip.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("model.res_head.skips.") for k in extra)
    assert not set(plain.state_dict()) - set(skip.state_dict())
    skip.load_state_dict(plain.state_dict(), strict=False)     # the same weights; the skips stay at zero
    b = tiny_batch()
    plain.eval(), skip.eval()
    with torch.no_grad():
        a = plain.model(b["image"], b["text_ids"], b["text_mask"])
        c = skip.model(b["image"], b["text_ids"], b["text_mask"])
    torch.testing.assert_close(a["mask_logits"], c["mask_logits"])        # training starts from the paper head
    maps = skip.model.vision.stem_maps                                     # this pass's stride-8 and stride-4 maps
    assert [tuple(m.shape) for m in maps] == [(4, 36, 8, 8), (4, 24, 16, 16)]

    skip.train()
    opt = torch.optim.SGD(skip.parameters(), lr=0.5)
    out = skip(b)
    out["loss"].backward()
    for conv in skip.model.res_head.skips:                                 # the mask losses reach the 1x1 convs
        assert conv.weight.grad.abs().sum() > 0
    opt.step()
    opt.zero_grad()
    skip(b)["focal"].backward()
    first_conv = skip.model.vision.vit.patch_embed.stem.backbone[0].conv.weight
    grad_with = first_conv.grad.clone()
    # the same backward without the skip path: the stem's first conv gets a different gradient, i.e. the skip
    # path carries the mask loss to it directly
    first_conv.grad = None
    with torch.no_grad():
        for conv in skip.model.res_head.skips:
            conv.weight.zero_()
    skip(b)["focal"].backward()
    assert not torch.allclose(first_conv.grad, grad_with)


def test_res_skip_needs_a_conv_stem():
    with pytest.raises(ConfigError, match="model.res_skip .* model.vision.conv_stem"):
        build_task(tiny_config(**{"model.res_skip": True}))
    with pytest.raises(ConfigError, match="strides \\[2, 4\\]"):         # a /8 stem reaches stride 4 only
        build_task(tiny_config(**{"model.res_skip": True, "model.vision.conv_stem": [12, 24, 48],
                                  "model.vision.conv_stem_add": True,
                                  "model.vision.timm_kwargs": {"embed_dim": 48, "depth": 4, "num_heads": 4,
                                                               "patch_size": 8}}))
