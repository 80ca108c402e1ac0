"""The on-disk sample schema (DESIGN.md): constants, tar-safe keys, text cleaning and record validation.

Both the writer (shards.build) and the checker (shards.inspect) use these, so what is written is what is
checked.
"""
from __future__ import annotations

import re
from typing import Any

SCHEMA_VERSION = 1
JPEG_QUALITY = 90           # fixed so that re-encoding is deterministic
SHARD_PATTERN = "shard-%06d.tar"
MANIFEST = "manifest.json"
REGION_KINDS = ("region", "object")

_UNSAFE = re.compile(r"[^A-Za-z0-9_+-]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def make_key(source: str, image_id: Any) -> str:
    """Return the tar-safe sample key ``<source>-<image_id>``.

    WebDataset splits a member name at the *first* dot into key and extension, and tar paths treat '/'
    as a folder, so every character outside ``[A-Za-z0-9_+-]`` becomes '_' (``refcoco+`` stays readable).
    """
    key = f"{source}-{image_id}"
    return _UNSAFE.sub("_", key)


def clean_text(text: Any) -> tuple[str | None, str | None]:
    """Normalise one caption/phrase: collapse whitespace and strip.

    Returns ``(text, None)`` or ``(None, reason)`` with reason ``text_empty`` or ``text_not_utf8`` (lone
    surrogates, e.g. from bytes decoded with ``surrogateescape``, or a JSON ``\\udc80`` escape).
    """
    if not isinstance(text, str):
        return None, "text_empty"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return None, "text_not_utf8"
    text = " ".join(_CONTROL.sub(" ", text).split())     # NUL and other control characters count as spaces
    if not text:
        return None, "text_empty"
    return text, None


def _is_box(b: Any) -> bool:
    return (isinstance(b, list) and len(b) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in b))


def box_problem(bbox: Any, width: int, height: int, tol: float = 1e-3) -> str | None:
    """Why ``bbox`` ([x, y, w, h]) is not a positive-area box inside a ``width`` x ``height`` image."""
    if not _is_box(bbox):
        return f"bbox {bbox!r} is not [x, y, w, h]"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return f"bbox {bbox} has zero area"
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        return f"bbox {bbox} outside the {width}x{height} image"
    return None


def is_generalised_ref(ref: Any) -> bool:
    """A gRefCOCO-style ref (several targets or none): it carries an ``ann_ids`` list instead of ``ann_id``."""
    return isinstance(ref, dict) and "ann_ids" in ref


def _is_rle(m: Any, w: int, h: int) -> bool:
    return isinstance(m, dict) and m.get("size") == [h, w] and isinstance(m.get("counts"), str)


def _generalised_ref_problems(r: dict, w: int, h: int) -> list[str]:
    """A generalised ref: ``ann_ids`` [int] (empty for no target), ``no_target`` bool (true exactly when
    ``ann_ids`` is empty), ``bboxes`` one box per ann id, optional ``masks`` one RLE per ann id; no ``bbox``."""
    problems = []
    ids, boxes, no_target = r.get("ann_ids"), r.get("bboxes"), r.get("no_target")
    if not isinstance(ids, list) or not all(isinstance(a, int) and not isinstance(a, bool) for a in ids):
        return ["ann_ids must be a list of integers"]
    if not isinstance(no_target, bool) or no_target != (not ids):
        problems.append(f"no_target must be a bool, true exactly when ann_ids is empty (got {no_target!r})")
    if "bbox" in r or "mask" in r:
        problems.append("a generalised ref holds bboxes/masks lists, not bbox/mask")
    if not isinstance(boxes, list) or len(boxes) != len(ids):
        problems.append("bboxes must be a list with one box per ann id")
    else:
        problems += [p for b in boxes if (p := box_problem(b, w, h))]
    masks = r.get("masks")
    if masks is not None and (not isinstance(masks, list) or len(masks) != len(ids)
                              or not all(_is_rle(m, w, h) for m in masks)):
        problems.append(f"masks must be a list of compressed RLEs of size [{h}, {w}], one per ann id")
    return problems


def validate_record(rec: Any) -> list[str]:
    """Return every way ``rec`` (one sample's JSON) breaks the schema; an empty list means valid.

    Masks are checked for shape here (size equals the stored size); decoding them is left to callers that
    have pycocotools loaded.
    """
    if not isinstance(rec, dict):
        return ["record is not a JSON object"]
    problems = []
    if rec.get("schema") != SCHEMA_VERSION:
        problems.append(f"schema {rec.get('schema')!r} != {SCHEMA_VERSION}")
    for k in ("source", "image_id"):
        if not isinstance(rec.get(k), str) or not rec.get(k):
            problems.append(f"{k} missing or not a string")
    for k in ("width", "height", "orig_width", "orig_height"):
        if not isinstance(rec.get(k), int) or rec.get(k) <= 0:
            problems.append(f"{k} missing or not a positive int")
    if problems:
        return problems
    w, h = rec["width"], rec["height"]
    caps, regions, refs = rec.get("captions", []), rec.get("regions", []), rec.get("refs", [])
    if not isinstance(caps, list) or not all(isinstance(c, str) and c.strip() for c in caps):
        problems.append("captions must be a list of non-empty strings")
    if not isinstance(regions, list):
        problems.append("regions must be a list")
        regions = []
    for i, r in enumerate(regions):
        if not isinstance(r, dict):
            problems.append(f"regions[{i}] is not an object")
            continue
        if (p := box_problem(r.get("bbox"), w, h)):
            problems.append(f"regions[{i}]: {p}")
        if not isinstance(r.get("text"), str) or not r["text"].strip():
            problems.append(f"regions[{i}]: empty text")
        if r.get("kind") not in REGION_KINDS:
            problems.append(f"regions[{i}]: kind {r.get('kind')!r} not in {REGION_KINDS}")
    if not isinstance(refs, list):
        problems.append("refs must be a list")
        refs = []
    for i, r in enumerate(refs):
        if not isinstance(r, dict):
            problems.append(f"refs[{i}] is not an object")
            continue
        if is_generalised_ref(r):
            problems += [f"refs[{i}]: {p}" for p in _generalised_ref_problems(r, w, h)]
        elif (p := box_problem(r.get("bbox"), w, h)):
            problems.append(f"refs[{i}]: {p}")
        sents = r.get("sentences")
        if not isinstance(sents, list) or not sents or not all(isinstance(s, str) and s.strip() for s in sents):
            problems.append(f"refs[{i}]: sentences must be a non-empty list of non-empty strings")
        if not isinstance(r.get("split"), str):
            problems.append(f"refs[{i}]: split missing")
        m = r.get("mask")
        if m is not None:
            if not isinstance(m, dict) or m.get("size") != [h, w] or not isinstance(m.get("counts"), str):
                problems.append(f"refs[{i}]: mask must be a compressed RLE of size [{h}, {w}]")
    if not (caps or regions or refs):
        problems.append("sample has no captions, regions or refs")
    return problems
