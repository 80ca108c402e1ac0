"""Context expressions (data.context_refs + loss.context): which other objects come with an item, that their
masks and words follow the item's view, and the loss on them (by hand, gradients, config errors)."""
import numpy as np
import pytest
import torch

from finetune.config import ConfigError
from finetune.context_loss import context_losses
from finetune.losses import box_losses_per_sample, dice_loss, focal_loss
from finetune.task import build_task
from finetune_helpers import tiny_batch, tiny_config
from loader_shards import grounding_record, write_shards
from shards.context import choose_context, kept_in_view
from shards.index import GroundingDataset
from shards.text import clean_caption, swap_left_right


def _refs():
    one = lambda rid, ann, *s: {"ref_id": rid, "ann_id": ann, "bbox": [0, 0, 4, 4], "sentences": list(s)}
    return [one(0, 1, "red dog"), one(1, 1, "the red dog"), one(2, 2, "blue cat", "a Blue cat"),
            one(3, 2, "cat"), one(4, 3, "green bird"), one(5, 4, "", "  "),
            {"ref_id": 6, "ann_ids": [2, 3], "bboxes": [[0, 0, 4, 4]] * 2, "no_target": False,
             "sentences": ["all animals"]}]


def test_choose_context_one_expression_per_other_object():
    refs = _refs()
    for seed in range(20):
        got = choose_context(refs, 0, 5, np.random.default_rng(seed))
        anns = [refs[j]["ann_id"] for j, _ in got]
        # not the item's own object (ann 1, also ref 1), not the generalised ref, not a ref without a sentence
        assert sorted(anns) == [2, 3]
        for j, text in got:
            assert text in [clean_caption(s, 1000) for s in refs[j]["sentences"]]
        assert got == choose_context(refs, 0, 5, np.random.default_rng(seed))        # repeatable
    assert len(choose_context(refs, 0, 1, np.random.default_rng(0))) == 1
    texts = {t for s in range(40) for _, t in choose_context(refs, 0, 2, np.random.default_rng(s))}
    assert {"blue cat", "a blue cat", "cat", "green bird"} <= texts                   # every sentence can come


def test_choose_context_several_expressions_per_object(tmp_path, tok):
    refs = _refs()
    for seed in range(20):
        got = choose_context(refs, 0, 5, np.random.default_rng(seed), per_object=2)
        by_ann: dict = {}
        for j, text in got:
            by_ann.setdefault(refs[j]["ann_id"], []).append(text)
        # ann 2 has three sentences over two refs (two distinct after cleaning + "cat"): two of them, never twice
        # the same; ann 3 has one; the item's own object and the generalised ref never come
        assert sorted(by_ann) == [2, 3] and len(by_ann[2]) == 2 and len(set(by_ann[2])) == 2
        assert by_ann[3] == ["green bird"]
        anns = [refs[j]["ann_id"] for j, _ in got]
        assert anns == sorted(anns, key=anns.index)               # one object's expressions side by side
    assert len(choose_context(refs, 0, 1, np.random.default_rng(0), per_object=3)) in (1, 3)
    # the dataset holds context_refs x context_per_object slots
    d = _train_dir(tmp_path)
    ds = GroundingDataset(d, tok, train=True, image_size=48, max_len=12, context_refs=3, context_per_object=2)
    item = ds[0]
    assert item["context_ids"].shape == (6, 12) and item["context_masks"].shape == (6, 48, 48)
    assert item["context_valid"].shape == (6,) and item["context_boxes"].shape == (6, 4)


def test_kept_in_view():
    box = [10, 10, 5, 5]
    assert kept_in_view("the dog on the left", box, None)                            # no crop: all true
    assert kept_in_view("red dog", box, (10, 10, 15, 15))
    assert not kept_in_view("the dog on the left", box, (0, 0, 50, 50))              # direction word
    assert not kept_in_view("red dog", box, (11, 0, 50, 50))                         # box cut by the crop
    assert not kept_in_view("red dog", box, (0, 0, 14, 50))


def _train_dir(tmp_path, sentences=None):
    def rec(source, i, rng, **kw):
        r, jpg = grounding_record(source, i, rng, n_refs=4, sentences=(1, 2), split="train")
        if sentences:
            for ref, s in zip(r["refs"], sentences):
                ref["sentences"] = [s]
        return r, jpg
    return write_shards(tmp_path / "train", "refcoco", 1, 3, record=rec)


def test_context_masks_and_words_follow_the_view(tmp_path, tok):
    d = _train_dir(tmp_path)
    kw = dict(train=True, image_size=48, max_len=12, flip_prob=0.0, crop_prob=0.0)
    plain = GroundingDataset(d, tok, **kw)
    ctx = GroundingDataset(d, tok, context_refs=3, **kw)
    dec = lambda ids, m: tok.decode(ids[m.bool()], skip_special_tokens=True)
    n_valid = 0
    for i in range(len(ctx)):
        a, b = plain[i], ctx[i]
        for k in ("image", "mask", "bbox", "text_ids"):          # the item itself does not change
            assert torch.equal(a[k], b[k])
        img_i, ri, _ = ctx.items[i]
        refs = ctx.images[img_i]["refs"]
        assert b["context_valid"].sum() == 3                      # four objects: three others, no crop
        s, (ox, oy) = b["scale"].item(), b["offset"].tolist()
        for j in range(3):
            text = dec(b["context_ids"][j], b["context_text_mask"][j])
            owners = [r for r in refs if r["ann_id"] != refs[ri]["ann_id"]
                      and text in [clean_caption(x, 1000) for x in r["sentences"]]]
            assert owners, text
            x, y, w, h = owners[0]["bbox"]
            ys, xs = torch.nonzero(b["context_masks"][j], as_tuple=True)
            assert abs(xs.min().item() - (x * s + ox)) <= 1.5 and abs(xs.max().item() + 1 - ((x + w) * s + ox)) <= 1.5
            assert abs(ys.min().item() - (y * s + oy)) <= 1.5 and abs(ys.max().item() + 1 - ((y + h) * s + oy)) <= 1.5
            cx, cy, bw, bh = (b["context_boxes"][j] * 48).tolist()
            assert abs(cx - ((x + w / 2) * s + ox)) <= 1.0 and abs(bw - w * s) <= 1.0
            assert abs(cy - ((y + h / 2) * s + oy)) <= 1.0 and abs(bh - h * s) <= 1.0
            n_valid += 1
    assert n_valid == 3 * len(ctx)
    # evaluation items carry no context
    assert "context_valid" not in GroundingDataset(d, tok, train=False, image_size=48, max_len=12, context_refs=3)[0]
    with pytest.raises(ValueError, match="max_targets"):
        GroundingDataset(d, tok, context_refs=2, max_targets=2, **kw)


def test_context_flip_and_crop(tmp_path, tok):
    d = _train_dir(tmp_path, ["red dog", "the dog on the left", "blue cat", "green bird"])
    dec = lambda ids, m: tok.decode(ids[m.bool()], skip_special_tokens=True)
    flipped = GroundingDataset(d, tok, train=True, image_size=48, max_len=12, flip_prob=1.0, crop_prob=0.0,
                               context_refs=3)
    for i in range(len(flipped)):
        it = flipped[i]
        texts = [dec(it["context_ids"][j], it["context_text_mask"][j]) for j in range(3)]
        assert "the dog on the left" not in texts
        if flipped.items[i][1] != 1:
            assert swap_left_right("the dog on the left") in texts
    cropped = GroundingDataset(d, tok, train=True, image_size=48, max_len=12, flip_prob=0.0, crop_prob=1.0,
                               context_refs=3)
    seen = {True: 0, False: 0}
    for i in range(len(cropped)):
        img_i, ri, _ = cropped.items[i]
        if ri == 1:                       # its own direction word forbids the crop: every context stays
            assert cropped[i]["context_valid"].all()
            continue
        it = cropped[i]
        refs = cropped.images[img_i]["refs"]
        for j in range(3):
            text = dec(it["context_ids"][j], it["context_text_mask"][j])
            ref = next(r for r in refs if clean_caption(r["sentences"][0], 1000) == text)
            valid = bool(it["context_valid"][j])
            seen[valid] += 1
            if "left" in text:
                assert not valid                                    # direction word after a crop
            elif valid:                                             # a kept object is whole in the view
                x, y, w, h = ref["bbox"]
                area = w * h * it["scale"].item() ** 2
                assert abs(it["context_masks"][j].sum().item() - area) <= 0.15 * area + 8
    assert seen[True] and seen[False]


def _context_batch(n=4, k=2, size=64, length=8):
    b = tiny_batch(n, size, length)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 120, (n, k, length), generator=g)
    ids[..., 0] = 101 % 120
    b["context_ids"] = ids
    b["context_text_mask"] = torch.ones(n, k, length, dtype=torch.long)
    b["context_text_mask"][..., 5:] = 0
    b["context_masks"] = torch.zeros(n, k, size, size, dtype=torch.uint8)
    b["context_masks"][:, 0, :20, :20] = 1
    b["context_masks"][:, 1, 30:, 30:] = 1
    b["context_boxes"] = torch.tensor([[10 / 64, 10 / 64, 20 / 64, 20 / 64], [47 / 64, 47 / 64, 34 / 64, 34 / 64]])
    b["context_boxes"] = b["context_boxes"].expand(n, k, 4).clone()
    b["context_valid"] = torch.tensor([[True, True], [True, False], [False, False], [False, True]])
    return b


def test_context_loss_by_hand_and_gradients():
    torch.manual_seed(0)
    task = build_task(tiny_config(**{"loss.context": 1.0, "data.context_refs": 2}))
    batch = _context_batch()
    task.eval()                           # no dropout: the two computations must agree
    out = task.model(batch["image"], batch["text_ids"], batch["text_mask"])
    got = context_losses(task.model, out, batch, focal=4.0, dice=3.0, l1=2.0, giou=0.5)
    logits, targets, boxes, box_targets = [], [], [], []
    for b, k in [(0, 0), (0, 1), (1, 0), (3, 1)]:
        ids, m = batch["context_ids"][b, k][None], batch["context_text_mask"][b, k][None]
        cls = task.model.encode_text(ids, m)[:, 0]
        logits.append(task.model.res_head.logits(out["pixel_emb"][b][None], cls, (64, 64)))
        targets.append(batch["context_masks"][b, k][None].float())
        boxes.append(task.model.rec_head(out["visual"][b][None], cls, out["grid"])[0])
        box_targets.append(batch["context_boxes"][b, k][None])
    logits, targets = torch.cat(logits), torch.cat(targets)
    want_mask = 4.0 * focal_loss(logits, targets) + 3.0 * dice_loss(logits, targets)
    l1, giou = box_losses_per_sample(torch.cat(boxes), torch.cat(box_targets))
    want_box = 2.0 * l1.mean() + 0.5 * giou.mean()
    torch.testing.assert_close(got["context_mask"], want_mask, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["context_box"], want_box, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["context"], want_mask + want_box, rtol=1e-4, atol=1e-5)
    mask_only = context_losses(task.model, out, batch, focal=4.0, dice=3.0)
    assert mask_only["context_box"].item() == 0.0
    torch.testing.assert_close(mask_only["context"], want_mask, rtol=1e-4, atol=1e-5)
    # the term trains the text encoder, both heads and the backbone
    task.zero_grad()
    task.train()
    got["context"].backward()
    for name in ("model.text.", "model.res_head.", "model.rec_head.", "model.vision.vit."):
        grads = [p.grad for n, p in task.named_parameters() if n.startswith(name) and p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), name
    # the task adds it at loss.context; no valid context: zero, still differentiable
    terms = task(batch)
    assert "context" in terms and terms["context"] > 0
    batch["context_valid"][:] = False
    none = context_losses(task.model, out, batch, focal=4.0, dice=3.0, l1=1.0, giou=1.0)["context"]
    assert none.item() == 0.0 and none.requires_grad


def test_context_config_errors():
    with pytest.raises(ConfigError, match="data.context_refs"):
        tiny_config(**{"loss.context": 1.0})
    with pytest.raises(ConfigError, match="loss.context"):
        tiny_config(**{"data.context_refs": 2})
    with pytest.raises(ConfigError, match="model.head"):
        tiny_config(**{"loss.context": 1.0, "data.context_refs": 2, "model.head": "mdetr"})
    with pytest.raises(ConfigError, match="context_refs"):
        tiny_config(**{"data.context_refs": -1})
    with pytest.raises(ConfigError, match="data.context_per_object=2 needs data.context_refs"):
        tiny_config(**{"data.context_per_object": 2})
    with pytest.raises(ConfigError, match="context_per_object"):
        tiny_config(**{"data.context_per_object": 0, "data.context_refs": 2, "loss.context": 1.0})
