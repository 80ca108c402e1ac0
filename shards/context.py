"""Context expressions: the other objects of a training image, each with one of its own expressions.

A grounding item names one object. The same image usually holds refs to other objects too (RefCOCO: about
three per image; the synthetic scenes two to six), each with its own expressions and masks. Handing a few of
them to the model beside the item (`data.context_refs`) lets a loss supervise how every named object's pixels
match its expression in the backbone pass the item pays for anyway (finetune.context_loss). This module
chooses them and decides which stay true in the augmented view:

- one expression per other object (distinct ann_id, one-target refs only), or up to `per_object` distinct ones
  (`data.context_per_object`: every sentence of every ref to that object is a candidate), objects and
  sentences drawn from the item's own generator, so the choice repeats for a seed and epoch;
- after a crop (the item's crop keeps its own target), a context expression stays only when the crop keeps
  its whole box and the expression has no direction word: the same rule that allows the item's own crop
  ("leftmost", "left of the star" may name another object once part of the scene is gone); an attribute
  expression of an object that is kept names it in any part of the scene that holds it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from shards.schema import is_generalised_ref
from shards.text import clean_caption, has_direction_words


def choose_context(refs: Sequence[dict], ri: int, k: int, rng: np.random.Generator,
                   per_object: int = 1) -> list[tuple[int, str]]:
    """(ref index, cleaned sentence) pairs naming up to `k` objects other than refs[ri]'s, up to `per_object`
    distinct sentences each (one object's pairs next to each other)."""
    own = refs[ri].get("ann_id")
    by_object: dict = {}
    for j, r in enumerate(refs):
        if j == ri or is_generalised_ref(r) or (own is not None and r.get("ann_id") == own):
            continue
        sents = [clean_caption(s, 1000) for s in r.get("sentences") or [] if isinstance(s, str)]
        sents = [s for s in sents if s]
        if sents:
            by_object.setdefault(r.get("ann_id", ("ref", j)), []).append((j, sents))
    groups = list(by_object.values())
    out = []
    for g in rng.permutation(len(groups))[:k]:
        if per_object == 1:     # the draws of one expression per object, as before per_object existed
            j, sents = groups[g][int(rng.integers(len(groups[g])))]
            out.append((j, sents[int(rng.integers(len(sents)))]))
            continue
        pool = list({s: (j, s) for j, sents in groups[g] for s in sents}.values())      # distinct sentences
        out += [pool[i] for i in rng.permutation(len(pool))[:per_object]]
    return out


def kept_in_view(text: str, box_xywh: Sequence[float], window: Optional[tuple]) -> bool:
    """True when a context expression still names its object in the view: no crop, or a crop (x0, y0, x1, y1)
    that keeps the whole box and an expression without direction words."""
    if window is None:
        return True
    if has_direction_words(text):
        return False
    x, y, w, h = box_xywh
    x0, y0, x1, y1 = window
    return x >= x0 and y >= y0 and x + w <= x1 and y + h <= y1
