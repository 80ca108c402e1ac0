"""Language for the synthetic scenes: referring expressions (generated, parsed and resolved), captions and
region phrases, all from one small fixed vocabulary.

Referring expressions come in three kinds, CLEVR-Ref+ style:
  attribute    "the large green triangle"
  superlative  "the leftmost red circle"
  relation     "the small red circle left of the blue square"
`referring_expressions` keeps only expressions that pick out their target unambiguously: attributes must
match the target alone; a superlative's target must beat every other candidate by `margin`; a relation's
landmark must be unique and the target must lie at least `margin` on the named side of it while every
other candidate lies on the opposite side. `resolve` reads the *text* back (its own parser) and returns
every object a lenient reader could mean, so a test can check each expression against objects rebuilt from
the written files.

Generalised expressions (gRefCOCO style, shards.synthetic's grefcoco set) name several objects or none:
  all         "all the red shapes", "all the circles left of the blue star"   (every match, at least two)
  counted     "the two circles", "the three shapes right of the red square"    (the count is exact)
  no target   "the green star" when there is none: a singular description no object matches
`multi_target_expressions` and `no_target_expressions` draw them under the same margin rules as the
relations above (every target at least `margin` on the named side, every other candidate on the opposite
side); `resolve` returns exactly their targets (the empty list for no target).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from shards.synthetic_scene import COLORS, SHAPES, SIZES, Scene

MARGIN = 0.1  # of the shorter image side: how clearly a spatial relation must hold
NOUN = "shape"  # the head noun when the shape itself is not named ("the red shape")
RELATION_WORDS = {"left": ("left of", "to the left of"), "right": ("right of", "to the right of"),
                  "above": ("above", "over"), "below": ("below", "under")}
SUPERLATIVES = {"left": "leftmost", "right": "rightmost", "above": "topmost", "below": "bottommost"}
_PHRASE_TO_REL = {p: r for r, ps in RELATION_WORDS.items() for p in ps}
_SUPER_TO_DIR = {w: d for d, w in SUPERLATIVES.items()}
# Attribute subsets a description may use (size alone is too vague to name anything).
_DESC_FIELDS = (("shape",), ("color",), ("size", "shape"), ("size", "color"), ("color", "shape"),
                ("size", "color", "shape"))


class SceneObject(Protocol):
    shape: str
    color: str
    size: str

    @property
    def center(self) -> tuple[float, float]: ...


@dataclass(frozen=True)
class Desc:
    """A noun phrase: any of size, colour and shape (None = not said)."""

    size: str | None = None
    color: str | None = None
    shape: str | None = None

    def matches(self, o: SceneObject) -> bool:
        return all(v is None or v == getattr(o, k) for k, v in
                   (("size", self.size), ("color", self.color), ("shape", self.shape)))

    def text(self, plural: bool = False) -> str:
        return " ".join(w for w in (self.size, self.color, (self.shape or NOUN) + ("s" if plural else "")) if w)


COUNT_WORDS = {"two": 2, "three": 3, "four": 4}   # counted multi-target expressions ("the two circles")
ALL = "all"


@dataclass(frozen=True)
class Query:
    """A parsed referring expression. `quantity` None is the singular "the ..."; "all" or a COUNT_WORDS word
    make the target plural (a multi-target expression)."""

    target: Desc
    kind: str                      # "attribute" | "superlative" | "relation"
    direction: str | None = None   # left/right/above/below
    landmark: Desc | None = None
    quantity: str | None = None    # None | "all" | "two" | "three" | "four"


def _extremeness(o: SceneObject, direction: str) -> float:
    cx, cy = o.center
    return {"left": -cx, "right": cx, "above": -cy, "below": cy}[direction]


def _offset(a: SceneObject, landmark: SceneObject, direction: str) -> float:
    """How far `a` lies on the `direction` side of `landmark` (negative: the other side)."""
    return _extremeness(a, direction) - _extremeness(landmark, direction)


def resolve_query(q: Query, objects: Sequence[SceneObject], side: float) -> list[int]:
    """Indices of every object a lenient reader could take `q` to mean (unique <=> one index)."""
    m = MARGIN * side
    cands = [i for i, o in enumerate(objects) if q.target.matches(o)]
    if q.kind == "attribute":
        return cands
    if q.kind == "superlative":
        if not cands:
            return []
        best = max(_extremeness(objects[i], q.direction) for i in cands)
        return [i for i in cands if _extremeness(objects[i], q.direction) > best - m]
    landmarks = [j for j, o in enumerate(objects) if q.landmark.matches(o)]
    return sorted({i for j in landmarks for i in cands
                   if i != j and _offset(objects[i], objects[j], q.direction) > 0})


def parse(sentence: str) -> Query:
    """Parse a generated expression (the refer `sent` or `raw` form) back into a Query."""
    words = sentence.lower().replace(".", " ").split()
    text = " ".join(words)
    for phrase in sorted(_PHRASE_TO_REL, key=len, reverse=True):
        key = f" {phrase} "
        if key in f" {text} ":
            left, right = f" {text} ".split(key, 1)
            quantity, left_words = _quantifier(left.split())
            return Query(_parse_desc(left_words, plural=quantity is not None), "relation", _PHRASE_TO_REL[phrase],
                         _parse_desc(right.split()), quantity)
    quantity, words = _quantifier(words)
    if quantity is not None:
        return Query(_parse_desc(words, plural=True), "attribute", quantity=quantity)
    if words and words[0] == "the":
        words = words[1:]
    if words and words[0] in _SUPER_TO_DIR:
        return Query(_parse_desc(words[1:]), "superlative", _SUPER_TO_DIR[words[0]])
    return Query(_parse_desc(words), "attribute")


def _quantifier(words: list[str]) -> tuple[str | None, list[str]]:
    """("all" | count word | None, the words after it): "all the ...", "the two ...", "two ..."."""
    if words and words[0] == ALL:
        return ALL, words[2:] if words[1:2] == ["the"] else words[1:]
    rest = words[1:] if words[:1] == ["the"] else words
    if rest and rest[0] in COUNT_WORDS:
        return rest[0], rest[1:]
    return None, words


def _noun(w: str, plural: bool) -> str | None:
    """The shape (or NOUN) that `w` names in the expected number, else None."""
    base = w[:-1] if plural and w.endswith("s") else None if plural else w
    return base if base in SHAPES or base == NOUN else None


def _parse_desc(words: list[str], plural: bool = False) -> Desc:
    if words and words[0] == "the":
        words = words[1:]
    fields: dict[str, str] = {}
    for w in words:
        noun = _noun(w, plural)
        key = ("size" if w in SIZES else "color" if w in COLORS else "shape" if noun in SHAPES
               else "noun" if noun == NOUN else None)
        if key is None or key in fields:
            raise ValueError(f"cannot parse {' '.join(words)!r}: unexpected word {w!r}"
                             + (" (a plural noun is expected after a quantity)" if plural else ""))
        fields[key] = noun if key in ("shape", "noun") else w
    if "shape" not in fields and "noun" not in fields:
        raise ValueError(f"cannot parse {' '.join(words)!r}: no head noun")
    return Desc(fields.get("size"), fields.get("color"), fields.get("shape"))


def resolve(sentence: str, objects: Sequence[SceneObject], side: float) -> list[int]:
    """Parse `sentence` and return the indices of the objects it can refer to."""
    return resolve_query(parse(sentence), objects, side)


def _descs(o: SceneObject) -> list[Desc]:
    return [Desc(**{k: getattr(o, k) for k in fields}) for fields in _DESC_FIELDS]


def _unique_desc(objects: Sequence[SceneObject], j: int) -> Desc | None:
    """The shortest description that matches object j alone (None when it has a twin of every kind)."""
    for d in _descs(objects[j]):
        if [i for i, o in enumerate(objects) if d.matches(o)] == [j]:
            return d
    return None


def valid_queries(objects: Sequence[SceneObject], t: int, side: float) -> list[Query]:
    """Every query of the three kinds that names object t unambiguously (with margins, see module doc)."""
    m = MARGIN * side
    out: list[Query] = []
    for d in _descs(objects[t]):
        cands = [i for i, o in enumerate(objects) if d.matches(o)]
        if cands == [t]:
            out.append(Query(d, "attribute"))
            continue
        for direction in SUPERLATIVES:
            others = [_extremeness(objects[i], direction) for i in cands if i != t]
            if _extremeness(objects[t], direction) - max(others) >= m:
                out.append(Query(d, "superlative", direction))
        for j in range(len(objects)):
            dl = _unique_desc(objects, j) if j != t else None
            if dl is None:
                continue
            for direction in RELATION_WORDS:
                if (_offset(objects[t], objects[j], direction) >= m
                        and all(_offset(objects[i], objects[j], direction) <= 0
                                for i in cands if i not in (t, j))):
                    out.append(Query(d, "relation", direction, dl))
    return out


def render_query(q: Query, rng: np.random.Generator) -> tuple[str, str]:
    """(raw, sent): the raw text (mixed case, optional full stop, like real refer data) and its
    lower-cased, punctuation-free form."""
    plural = q.quantity is not None
    head = "all the" if q.quantity == ALL else f"the {q.quantity}" if plural else "the"
    if q.kind == "attribute":
        body = f"{head} {q.target.text(plural)}"
    elif q.kind == "superlative":
        body = f"the {SUPERLATIVES[q.direction]} {q.target.text()}"
    else:
        phrases = RELATION_WORDS[q.direction]
        body = f"{head} {q.target.text(plural)} {phrases[int(rng.integers(len(phrases)))]} the {q.landmark.text()}"
    sent = body if plural or rng.random() < 0.8 else body[len("the "):]
    raw = sent[0].upper() + sent[1:] if rng.random() < 0.5 else sent
    if rng.random() < 0.3:
        raw += "."
    return raw, sent


def referring_expressions(objects: Sequence[SceneObject], t: int, side: float, rng: np.random.Generator,
                          k: int = 3) -> list[tuple[str, str]]:
    """Up to k distinct (raw, sent) expressions for object t, preferring at least one that needs a
    superlative or a relation; [] when t cannot be named unambiguously."""
    qs = valid_queries(objects, t, side)
    spatial = [q for q in qs if q.kind != "attribute"]
    attribute = [q for q in qs if q.kind == "attribute"]
    order: list[Query] = []
    if spatial:
        order.append(spatial[int(rng.integers(len(spatial)))])
    if attribute:
        order.append(attribute[0])  # the shortest unique description
    rest = [q for q in qs if q not in order]
    order += [rest[i] for i in rng.permutation(len(rest))]
    out: list[tuple[str, str]] = []
    for q in order:
        raw, sent = render_query(q, rng)
        if sent not in {s for _, s in out}:
            out.append((raw, sent))
        if len(out) == k:
            break
    return out


def _quantities(n: int) -> list[str]:
    """The quantifiers that name exactly n >= 2 objects: "all", and the count word when there is one."""
    return [ALL] + [w for w, k in COUNT_WORDS.items() if k == n]


def multi_target_queries(objects: Sequence[SceneObject], side: float) -> dict[tuple[int, ...], list[Query]]:
    """Every plural query that names a set of at least two objects exactly, keyed by that set (sorted indices):
    attribute ("all the red shapes", "the two circles") and relation ("all the circles left of the star", the
    landmark unique, every target at least `margin` on the named side, every other candidate on the other)."""
    m = MARGIN * side
    out: dict[tuple[int, ...], list[Query]] = {}
    descs = list(dict.fromkeys(d for o in objects for d in _descs(o)))
    landmarks = [(j, d) for j in range(len(objects)) if (d := _unique_desc(objects, j)) is not None]
    for d in descs:
        cands = [i for i, o in enumerate(objects) if d.matches(o)]
        if len(cands) >= 2:
            out.setdefault(tuple(cands), []).extend(Query(d, "attribute", quantity=q) for q in _quantities(len(cands)))
        for j, dl in landmarks:
            others = [i for i in cands if i != j]
            for direction in RELATION_WORDS:
                targets = [i for i in others if _offset(objects[i], objects[j], direction) >= m]
                if len(targets) >= 2 and all(_offset(objects[i], objects[j], direction) <= 0
                                             for i in others if i not in targets):
                    out.setdefault(tuple(targets), []).extend(
                        Query(d, "relation", direction, dl, q) for q in _quantities(len(targets)))
    return out


def multi_target_expressions(objects: Sequence[SceneObject], side: float, rng: np.random.Generator, *,
                             refs: int = 2, k: int = 3) -> list[tuple[list[int], list[tuple[str, str]]]]:
    """Up to `refs` (targets, [(raw, sent), ...]) pairs, each naming a different set of >= 2 objects with up to
    k distinct expressions (drawn from multi_target_queries)."""
    groups = multi_target_queries(objects, side)
    keys = sorted(groups)
    out = []
    for gi in rng.permutation(len(keys))[:refs]:
        qs = groups[keys[int(gi)]]
        exprs: list[tuple[str, str]] = []
        for qi in rng.permutation(len(qs)):
            raw, sent = render_query(qs[int(qi)], rng)
            if sent not in {s for _, s in exprs}:
                exprs.append((raw, sent))
            if len(exprs) == k:
                break
        out.append((list(keys[int(gi)]), exprs))
    return out


def no_target_expressions(objects: Sequence[SceneObject], rng: np.random.Generator, k: int = 2
                          ) -> list[tuple[str, str]]:
    """Up to k singular descriptions that no object matches, near misses first: "the green star" when a star
    or a green shape is present but no green star, "the large red circle" when the red circle is small."""
    present = {(o.color, o.shape) for o in objects}
    near = [Desc(None, c, s) for s in SHAPES for c in COLORS if (c, s) not in present
            and any(o.shape == s or o.color == c for o in objects)]
    near += [Desc(z, o.color, o.shape) for o in objects for z in SIZES
             if not any(Desc(z, o.color, o.shape).matches(p) for p in objects)]
    near = list(dict.fromkeys(near))
    out: list[tuple[str, str]] = []
    for i in rng.permutation(len(near))[:k]:
        out.append(render_query(Query(near[int(i)], "attribute"), rng))
    return out


# ------------------------------------------------------------------ captions and region phrases
_COUNT_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight")


def _where(o: SceneObject, scene: Scene) -> str:
    """Where an object sits, in words: "in the top left corner", "on the right", "at the top", ..."""
    cx, cy = o.center
    col = "left" if cx < scene.width / 3 else "right" if cx > 2 * scene.width / 3 else None
    row = "top" if cy < scene.height / 3 else "bottom" if cy > 2 * scene.height / 3 else None
    if row and col:
        return f"in the {row} {col} corner"
    if col:
        return f"on the {col}"
    return f"at the {row}" if row else "in the center"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _a(phrase: str) -> str:
    return f"{_article(phrase)} {phrase}"


def _relation_word(a: SceneObject, b: SceneObject) -> str:
    """Where a lies relative to b along the axis that separates them most."""
    dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
    return ("left of" if dx > 0 else "right of") if abs(dx) >= abs(dy) else ("above" if dy > 0 else "below")


def _inventory(scene: Scene) -> str:
    counts: dict[str, int] = {}
    for o in scene.objects:
        counts[o.label] = counts.get(o.label, 0) + 1
    parts = [f"{_COUNT_WORDS[n]} {label}s" if n > 1 else _a(label) for label, n in counts.items()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """About five captions per image, COCO style: varied templates, some capitalised, some with a
    trailing space or newline as in the real files."""
    objs = scene.objects
    bg = f"{scene.tone} {scene.background if scene.background != 'noise' else 'noisy'} background"
    a, b = objs[0], objs[-1]
    rel = _relation_word(a, b)
    out = [
        f"{_inventory(scene)} on a {bg}",
        f"{_COUNT_WORDS[len(objs)]} shapes on a {bg}",
        f"{_a(a.size)} {a.label} {_where(a, scene)} of the picture",
        f"{_a(a.label)} {rel} {_a(b.label)}",
        f"a {scene.background} pattern with {_inventory(scene)}",
    ]
    if rng.random() < 0.3:
        areas = [o.bbox[2] * o.bbox[3] for o in objs]
        out.append(f"the biggest shape is {_a(objs[int(np.argmax(areas))].label)}"
                   if any(o.size == "large" for o in objs) else "all of the shapes are small")
    styled = []
    for c in out:
        r = rng.random()
        c = c[0].upper() + c[1:] if r < 0.4 else c.title() if r < 0.45 else c
        r = rng.random()
        styled.append(c + " " if r < 0.15 else c + "\n" if r < 0.2 else c + "." if r < 0.4 else c)
    return styled


def region_phrases(scene: Scene, rng: np.random.Generator) -> list[tuple[str, list[float]]]:
    """Visual Genome style (phrase, [x, y, w, h]) regions: one per object (attributes) plus relations
    between neighbours, whose box is the union of the two objects' boxes."""
    out: list[tuple[str, list[float]]] = []
    objs = scene.objects
    for o in objs:
        tpl = ("{a} {s} {c} {sh}", "the {sh} is {c}", "{c} {sh}", "{s} {sh} {p}")[int(rng.integers(4))]
        out.append((tpl.format(a=_article(o.size), s=o.size, c=o.color, sh=o.shape,
                               p=_where(o, scene)), o.bbox))
    for a, b in zip(objs, objs[1:]):
        rel = _relation_word(a, b)
        ax, ay, aw, ah = a.bbox
        bx, by, bw, bh = b.bbox
        x0, y0 = min(ax, bx), min(ay, by)
        box = [x0, y0, round(max(ax + aw, bx + bw) - x0, 2), round(max(ay + ah, by + bh) - y0, 2)]
        out.append((f"{a.color} {a.shape} {rel} {b.color} {b.shape}", box))
    return out
