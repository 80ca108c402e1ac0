"""Image and text encoders: token layouts for ViT and Swin, checkpoint loading, bidirectional text layers."""
import pytest
import torch
from transformers import BertConfig, BertModel

from pretrain.config import ConfigError, TextConfig, VisionConfig
from pretrain.encoders import (build_bert_config, build_text_encoder, build_vision_encoder, load_vision_weights,
                               vision_tokens)

SWIN_KW = {"embed_dim": 32, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4}


@pytest.mark.parametrize("img", [64, 96])
def test_vit_tokens_shape(img):
    model = build_vision_encoder(VisionConfig(name="vit_tiny_patch16_224", img_size=img))
    tok = vision_tokens(model, torch.randn(2, 3, img, img))
    assert tok.shape == (2, 1 + (img // 16) ** 2, 192) and tok.dtype == torch.float32


def test_swin_tokens_mean_cls_first():
    model = build_vision_encoder(VisionConfig(name="swin_tiny_patch4_window7_224", img_size=64,
                                              timm_kwargs=SWIN_KW))
    tok = vision_tokens(model, torch.randn(2, 3, 64, 64))
    assert tok.shape == (2, 1 + 8 * 8, 64)
    assert torch.allclose(tok[:, 0], tok[:, 1:].mean(1), atol=1e-6)


def test_vision_grad_checkpointing_same_output_and_grads():
    torch.manual_seed(0)
    cfg = VisionConfig(name="vit_tiny_patch16_224", img_size=32)
    a = build_vision_encoder(cfg)
    b = build_vision_encoder(cfg, grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    ya, yb = vision_tokens(a, x), vision_tokens(b, x)
    ya.sum().backward(), yb.sum().backward()
    assert torch.allclose(ya, yb, atol=1e-5)
    assert torch.allclose(a.patch_embed.proj.weight.grad, b.patch_embed.proj.weight.grad, atol=1e-4)


def test_vision_weights_resampled_to_new_grid(tmp_path):
    from safetensors.torch import save_file
    src = build_vision_encoder(VisionConfig(name="vit_tiny_patch16_224", img_size=64))
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = build_vision_encoder(VisionConfig(name="vit_tiny_patch16_224", img_size=96, checkpoint=str(path)))
    assert dst.pos_embed.shape == (1, 1 + 36, 192)
    assert torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert torch.equal(dst.pos_embed[:, 0], src.pos_embed[:, 0])        # cls position kept


def test_vision_weights_mismatch_is_a_clear_error(tmp_path):
    other = build_vision_encoder(VisionConfig(name="vit_small_patch16_224", img_size=32))
    model = build_vision_encoder(VisionConfig(name="vit_tiny_patch16_224", img_size=32))
    with pytest.raises(ConfigError, match="shapes do not fit"):
        load_vision_weights(model, other.state_dict())
    with pytest.raises(ConfigError, match="not found"):
        load_vision_weights(model, tmp_path / "missing.pt")


def tiny_text_cfg(**kw):
    base = dict(vocab_size=100, hidden_size=32, num_layers=4, num_heads=2, intermediate_size=64, text_layers=2,
                max_len=16)
    base.update(kw)
    return TextConfig(**base)


def test_text_encoder_loads_bert_dir_first_layers(tmp_path):
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                intermediate_size=64), add_pooling_layer=False)
    bert.save_pretrained(tmp_path / "bert")
    enc = build_text_encoder(tiny_text_cfg(bert=str(tmp_path / "bert")))
    sd = bert.state_dict()
    assert len(enc.layer) == 2
    for k, v in enc.state_dict().items():
        src = k.replace("layer.", "encoder.layer.", 1) if k.startswith("layer.") else k
        assert torch.equal(v, sd[src]), k
    # same numbers as BertModel itself on an unpadded input
    bert.encoder.layer = bert.encoder.layer[:2]
    ids = torch.randint(1, 100, (2, 7))
    enc.eval(), bert.eval()
    ref = bert(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert torch.allclose(enc(ids, torch.ones_like(ids)), ref, atol=1e-5)


def test_text_encoder_padding_is_ignored_and_bidirectional():
    torch.manual_seed(0)
    enc = build_text_encoder(tiny_text_cfg()).eval()
    ids = torch.randint(1, 100, (1, 8))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    out = enc(ids, mask)
    ids2 = ids.clone()
    ids2[0, 6] = (ids[0, 6] + 1) % 100          # a padded token: no effect on real tokens
    assert torch.allclose(enc(ids2, mask)[0, :5], out[0, :5], atol=1e-6)
    ids3 = ids.clone()
    ids3[0, 4] = (ids[0, 4] + 1) % 100          # a later real token: changes token 0
    assert not torch.allclose(enc(ids3, mask)[0, 0], out[0, 0], atol=1e-4)


def test_bert_config_errors():
    with pytest.raises(ConfigError, match="text_layers"):
        build_bert_config(tiny_text_cfg(text_layers=4))
    with pytest.raises(ConfigError, match="not a BERT checkpoint"):
        build_bert_config(tiny_text_cfg(bert="/nonexistent/bert"))


def test_conv_stem_keeps_the_token_grid_and_loads_at_another_size():
    """model.vision.conv_stem: four 3x3/2 convs replace the /16 patchify; same tokens out, resampled on load, and
    the fine-tuning backbone reads its grid from the stem."""
    from finetune.backbone import LawViT

    kw = {"depth": 2}
    a = build_vision_encoder(VisionConfig(name="vit_tiny_patch16_224", img_size=64, timm_kwargs=kw,
                                          conv_stem=[24, 48, 96, 192]))
    assert not hasattr(a.patch_embed, "proj") or not isinstance(a.patch_embed.proj, torch.nn.Conv2d)
    x = torch.randn(2, 3, 64, 64)
    tok = vision_tokens(a, x)
    assert tok.shape == (2, 1 + 4 * 4, 192)
    from pretrain.flops import vision_forward          # the MFU logger counts what it cannot derive
    assert vision_forward(a, 64) > 2 * 17 * 2 * (3 * 192 * 192)
    tok.sum().backward()
    assert a.patch_embed.backbone[0].conv.weight.grad.abs().sum() > 0
    b = build_vision_encoder(VisionConfig(name="vit_tiny_patch16_224", img_size=96, timm_kwargs=kw,
                                          conv_stem=[24, 48, 96, 192]))
    load_vision_weights(b, a.state_dict())
    assert torch.equal(b.patch_embed.backbone[0].conv.weight, a.patch_embed.backbone[0].conv.weight)
    tokens, hw = LawViT(b, 192, law=False, global_blocks=[1])(torch.randn(1, 3, 96, 96))
    assert hw == (6, 6) and tokens.shape == (1, 36, 192)


def test_conv_stem_add_sums_the_stem_and_the_patchify_tokens():
    """model.vision.conv_stem_add: the patchify layer stays and the stem's tokens are added to its tokens."""
    from finetune.backbone import LawViT

    a = build_vision_encoder(VisionConfig(name="vit_tiny_patch16_224", img_size=64, timm_kwargs={"depth": 1},
                                          conv_stem=[24, 48, 96, 192], conv_stem_add=True))
    x = torch.randn(2, 3, 64, 64)
    pe = a.patch_embed
    assert torch.allclose(pe(x), pe.patchify(x) + pe.stem(x)) and pe.img_size == (64, 64)
    tok = vision_tokens(a, x)
    assert tok.shape == (2, 1 + 4 * 4, 192)
    tok.sum().backward()
    assert pe.patchify.proj.weight.grad.abs().sum() > 0 and pe.stem.backbone[0].conv.weight.grad.abs().sum() > 0
    tokens, hw = LawViT(a, 192, law=False, global_blocks=[0])(x)
    assert hw == (4, 4) and tokens.shape == (2, 16, 192)
    with pytest.raises(ConfigError, match="conv_stem_add needs model.vision.conv_stem"):
        build_vision_encoder(VisionConfig(name="vit_tiny_patch16_224", img_size=64, timm_kwargs={"depth": 1},
                                          conv_stem_add=True))


def test_conv_stem_depth_adds_stride_one_convs():
    """model.vision.conv_stem_depth: k convs per width, the first of each stride 2; same token grid."""
    a = build_vision_encoder(VisionConfig(name="vit_tiny_patch16_224", img_size=64, timm_kwargs={"depth": 1},
                                          conv_stem=[24, 48, 96, 192], conv_stem_add=True, conv_stem_depth=2))
    convs = [m.conv for m in a.patch_embed.stem.backbone]
    assert [c.stride[0] for c in convs] == [2, 1, 2, 1, 2, 1, 2, 1]
    assert [c.out_channels for c in convs] == [24, 24, 48, 48, 96, 96, 192, 192]
    assert vision_tokens(a, torch.randn(2, 3, 64, 64)).shape == (2, 1 + 4 * 4, 192)
    with pytest.raises(ConfigError, match="conv_stem_depth: expected an integer >= 1"):
        build_vision_encoder(VisionConfig(name="vit_tiny_patch16_224", img_size=64, timm_kwargs={"depth": 1},
                                          conv_stem=[24, 48, 96, 192], conv_stem_depth=0))


@pytest.mark.parametrize("widths, msg", [([24, 48, 192], "stride 8, not the model's patch size 16"),
                                         ([24, 48, 96, 100], "last width 100 must be the embed_dim 192"),
                                         ("wide", "list of positive channel widths")])
def test_conv_stem_errors(widths, msg):
    with pytest.raises(ConfigError, match=msg):
        build_vision_encoder(VisionConfig(name="vit_tiny_patch16_224", img_size=64, timm_kwargs={"depth": 1},
                                          conv_stem=widths))


def test_cnn_trunk_is_a_hybrid_stem_on_the_same_grid():
    """model.vision.cnn_trunk: a timm CNN's stride-16 features (resnet18 to layer3) are the patch embedding, added
    to the patchify layer's with conv_stem_add; the grid, the LawViT path and loading at another size hold."""
    from finetune.backbone import LawViT
    from pretrain.flops import vision_forward

    cfg = dict(name="vit_tiny_patch16_224", timm_kwargs={"depth": 1}, cnn_trunk="resnet18", conv_stem_add=True)
    a = build_vision_encoder(VisionConfig(img_size=64, **cfg))
    pe = a.patch_embed
    trunk = pe.stem.backbone
    assert trunk.feature_info.reduction() == [16] and not hasattr(trunk, "layer4")
    x = torch.randn(2, 3, 64, 64)
    a.eval()
    assert torch.allclose(pe(x), pe.patchify(x) + pe.stem(x))
    tok = vision_tokens(a, x)
    assert tok.shape == (2, 1 + 4 * 4, 192)
    tok.sum().backward()
    assert trunk.conv1.weight.grad.abs().sum() > 0 and pe.patchify.proj.weight.grad.abs().sum() > 0
    assert vision_forward(a, 64) > 2 * 17 * 2 * (3 * 192 * 192)
    b = build_vision_encoder(VisionConfig(img_size=96, **cfg))
    load_vision_weights(b, a.state_dict())
    assert torch.equal(b.patch_embed.stem.backbone.conv1.weight, trunk.conv1.weight)
    tokens, hw = LawViT(b, 192, law=False, global_blocks=[0])(torch.randn(1, 3, 96, 96))
    assert hw == (6, 6) and tokens.shape == (1, 36, 192)


@pytest.mark.parametrize("kw, msg", [({"cnn_trunk": "resnet18", "conv_stem": [24, 48, 96, 192]}, "two stems"),
                                     ({"cnn_trunk": "no_such_cnn"}, "cnn_trunk: Unknown model"),
                                     ({"cnn_trunk": "resnet18", "timm_kwargs": {"depth": 1, "patch_size": 12}},
                                      r"strides \[2, 4, 8, 16, 32\], none is the model's patch size 12")])
def test_cnn_trunk_errors(kw, msg):
    kw = {"timm_kwargs": {"depth": 1}, **kw}
    with pytest.raises(ConfigError, match=msg):
        build_vision_encoder(VisionConfig(name="vit_tiny_patch16_224", img_size=64, **kw))
