"""The RefCOCO family as lichengunc/refer lays it out: `<root>/<dataset>/refs(<split_by>).p` + `instances.json`.

Reads refcoco / refcoco+ / refcocog (umd, google) / refclef (unc, berkeley) into shard `Item`s (one per image
and split, holding all refs of that image in that split), and computes the leakage exclusion set of
DATA_FORMATS.md §2.2: every image of a non-train split of RefCOCO (unc), RefCOCO+ (unc) and RefCOCOg (umd).

The refs pickles are Python-2 pickles in the wild: they are opened with a restricted unpickler (plain
containers and scalars only, never arbitrary globals) and fall back to `encoding="latin1"` when Python-2
byte strings are not ASCII. Boxes and masks are not in the pickle: they come from instances.json by ann_id.
The image path is built from image_id, never from the pickle's `file_name` (whose suffix is not the ann_id
in refcoco).

gRefCOCO (generalised referring, henghuiding/ReLA's `grefer.py` layout; DATA_FORMATS.md "gRefCOCO"):
`<root>/grefcoco/grefs(unc).json` (or `grefs(unc).p`) + `<root>/grefcoco/instances.json` (COCO). The refs file is a
list of dicts with `ref_id`, `image_id`, `split`, `sentences` (refer's sentence dicts or strings) and `ann_id`,
which is an int or a list of ints: `[-1]` (or -1) means no target; an optional `no_target` bool must agree.
`category_id` may be an int or a list and is ignored (each target's category comes from instances.json).
Such refs are written in the generalised schema (shards.schema.is_generalised_ref): `ann_ids` (empty for no
target), `no_target`, `bboxes` and `masks` (one per target); the one-target schema of the refer datasets is
unchanged. A ref with a malformed `ann_id` or a contradicting `no_target` is refused and counted.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from shards.build import Item
from shards.inputs import InputError, is_plain_name, load_json, require_list
from shards.schema import make_key

DATASETS = ("refcoco", "refcoco+", "refcocog", "refclef", "grefcoco")
SPLIT_BYS = {"refcoco": ("unc", "google"), "refcoco+": ("unc",), "refcocog": ("umd", "google"),
             "refclef": ("unc", "berkeley"), "grefcoco": ("unc",)}
GENERALISED = ("grefcoco",)     # refs name several targets or none
# DATA_FORMATS §2.2: the evaluation splits whose images must never be seen in pretraining.
EXCLUSION_SOURCES = (("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd"))
GOOGLE_SOURCES = (("refcoco", "google"), ("refcocog", "google"))
_REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")


class ReferFormatError(InputError, ValueError):
    """A missing or malformed refer file; str() is `<file>: <problem>` (the CLI prints it, exit code 2)."""


class _PlainUnpickler(pickle.Unpickler):
    """refs pickles hold only lists, dicts, strings and numbers: refuse any global (no code execution)."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")


def _unpickle(data: bytes, encoding: str) -> Any:
    return _PlainUnpickler(io.BytesIO(data), encoding=encoding).load()


def _repair_utf8(obj: Any) -> Any:
    """Undo latin1 decoding of Python-2 UTF-8 byte strings ("cafÃ©" -> "café") where that is unambiguous:
    the latin1 bytes form valid UTF-8. Anything else is kept as it is."""
    if isinstance(obj, str):
        try:
            return obj.encode("latin1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            return obj
    if isinstance(obj, list):
        return [_repair_utf8(v) for v in obj]
    if isinstance(obj, dict):
        return {_repair_utf8(k): _repair_utf8(v) for k, v in obj.items()}
    return obj


def load_refs(path: str | Path) -> list[dict]:
    """The list of ref dicts in a `refs(<split_by>).p` file (any pickle protocol, Python 2 or 3)."""
    p = Path(path)
    if not p.is_file():
        raise ReferFormatError(p, "no such file" if not p.exists() else "not a file")
    data = p.read_bytes()
    try:
        try:
            refs = _unpickle(data, "ASCII")
        except UnicodeDecodeError:  # Python-2 str holding non-ASCII bytes
            refs = _repair_utf8(_unpickle(data, "latin1"))
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, MemoryError) as e:
        raise ReferFormatError(p, f"not a refer refs pickle ({type(e).__name__}: {e})") from None
    if not isinstance(refs, list):
        raise ReferFormatError(p, f"expected a pickled list of refs, found {type(refs).__name__}")
    for i, r in enumerate(refs):
        missing = [k for k in _REF_KEYS if not isinstance(r, dict) or k not in r]
        if missing:
            raise ReferFormatError(p, f"ref {i} lacks key(s) {', '.join(missing)}")
    return refs


def grefs_path(refer_root: str | Path, dataset: str, split_by: str) -> Path:
    """`<root>/<dataset>/grefs(<split_by>).json`, or the `.p` pickle when only that exists."""
    base = Path(refer_root) / dataset
    js = base / f"grefs({split_by}).json"
    pk = base / f"grefs({split_by}).p"
    return pk if not js.exists() and pk.is_file() else js


def load_grefs(path: str | Path) -> list[dict]:
    """The list of ref dicts of a gRefCOCO refs file (JSON, or a refer-style pickle)."""
    p = Path(path)
    if p.suffix == ".p":
        return load_refs(p)
    try:
        refs = load_json(p, list)
    except InputError as e:
        raise ReferFormatError(e.path, e.problem) from None
    for i, r in enumerate(refs):
        missing = [k for k in _REF_KEYS if not isinstance(r, dict) or k not in r]
        if missing:
            raise ReferFormatError(p, f"ref {i} lacks key(s) {', '.join(missing)}")
    return refs


def target_ann_ids(ref: dict) -> list[int] | None:
    """A gRefCOCO ref's target annotation ids (`ann_id` an int or a list; -1 / [-1] = no target -> []), or None
    when `ann_id` is malformed or contradicts an explicit `no_target`."""
    a = ref["ann_id"]
    ids = [a] if _is_int(a) else a if isinstance(a, list) and all(_is_int(v) for v in a) else None
    if ids is None:
        return None
    if ids == [-1]:
        ids = []
    if any(v < 0 for v in ids) or len(set(ids)) != len(ids):
        return None
    nt = ref.get("no_target")
    if nt is not None and (not isinstance(nt, bool) or nt != (not ids)):
        return None
    return ids


def load_instances(path: str | Path) -> dict:
    """A refer `instances.json` (COCO-style; `images` and `annotations` lists required)."""
    try:
        data = load_json(path, dict)
        for key in ("images", "annotations"):
            require_list(path, data, key)
    except InputError as e:
        raise ReferFormatError(e.path, e.problem) from None
    seen: set[int] = set()
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or "id" not in a or "bbox" not in a:
            raise ReferFormatError(path, f"annotations[{i}] lacks 'id' or 'bbox'")
        if not _is_int(a["id"]):
            raise ReferFormatError(path, f"annotations[{i}]: id {a['id']!r:.40} is not an integer")
        if a["id"] in seen:
            raise ReferFormatError(path, f"annotations[{i}]: duplicate annotation id {a['id']}")
        seen.add(a["id"])
    seen = set()
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not _is_int(im.get("id")):
            raise ReferFormatError(path, f"images[{i}] has no integer 'id'")
        if not all(_is_int(im.get(k)) and im[k] > 0 for k in ("width", "height")):
            raise ReferFormatError(path, f"images[{i}] (id {im['id']}) has no positive integer width/height")
        if im["id"] in seen:
            raise ReferFormatError(path, f"images[{i}]: duplicate image id {im['id']}")
        seen.add(im["id"])
    return data


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def ref_problem(ref: dict) -> str | None:
    """The skip reason of a ref whose fields cannot be used as they are, or None."""
    if not _is_int(ref["ref_id"]):
        return "ref_bad_ref_id"
    if not _is_int(ref["image_id"]) or ref["image_id"] < 0:
        return "ref_bad_image_id"
    if "ann_ids" in ref:                    # a gRefCOCO ref after target_ann_ids
        if ref["ann_ids"] is None:
            return "ref_bad_ann_id"
    elif not _is_int(ref["ann_id"]):
        return "ref_bad_ann_id"
    if not is_plain_name(ref["split"]):
        return "ref_bad_split"              # a split becomes a directory name: never a path
    if not isinstance(ref["sentences"], list):
        return "ref_bad_sentences"
    if ("ann_ids" not in ref and "category_id" in ref and ref["category_id"] is not None
            and not _is_int(ref["category_id"])):      # gRefCOCO: an int or a list, unused (instances.json has it)
        return "ref_bad_category_id"
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def refs_path(refer_root: str | Path, dataset: str, split_by: str) -> Path:
    return Path(refer_root) / dataset / f"refs({split_by}).p"


def excluded_image_ids(refer_root: str | Path, *, google: bool = False) -> tuple[set[int], dict]:
    """Image ids of every non-train ref of RefCOCO (unc), RefCOCO+ (unc) and RefCOCOg (umd) found under
    `refer_root` (plus the google splits when `google`), and their provenance: which refs files were
    used with their sha256 and counts, and which were absent."""
    root = Path(refer_root)
    if not root.is_dir():
        raise ReferFormatError(root, "no such directory" if not root.exists() else "not a directory")
    sources = EXCLUSION_SOURCES + (GOOGLE_SOURCES if google else ())
    ids: set[int] = set()
    used, missing = [], []
    for dataset, split_by in sources:
        p = refs_path(root, dataset, split_by)
        if not p.is_file():
            missing.append(str(p.relative_to(root)))
            continue
        refs = load_refs(p)
        ok = [r for r in refs if ref_problem(r) is None]
        mine = {r["image_id"] for r in ok if r["split"] != "train"}
        ids |= mine
        used.append({"file": str(p.relative_to(root)), "sha256": _sha256(p), "refs": len(refs),
                     "non_train_refs": sum(r["split"] != "train" for r in ok), "images": len(mine),
                     **({"refused_refs": len(refs) - len(ok)} if len(ok) < len(refs) else {})})
    if not used:
        raise ReferFormatError(root, "holds none of " + ", ".join(f"{d}/refs({s}).p" for d, s in sources))
    provenance = {"rule": "image_id of every ref whose split is not 'train' (DATA_FORMATS.md 2.2)",
                  "files": used, "missing": missing}
    return ids, provenance


def save_exclusion(path: str | Path, ids: set[int], provenance: dict) -> None:
    """Write the exclusion set as a sorted id list with its provenance (JSON)."""
    Path(path).write_text(json.dumps({"image_ids": sorted(ids), "provenance": provenance}, indent=1))


def image_path(images_dir: str | Path, dataset: str, image_id: int) -> Path | None:
    """The image file of `image_id`, built from the id (never from the refs' `file_name`): COCO train2014
    names for refcoco*, SAIAPR-TC12 `XX/images/<id>.jpg` or flat `<id>.jpg` for refclef. None if absent."""
    d = Path(images_dir)
    if dataset == "refclef":
        sub = f"{image_id // 1000:02d}"
        candidates = (d / "saiapr_tc-12" / sub / "images" / f"{image_id}.jpg",
                      d / sub / "images" / f"{image_id}.jpg", d / f"{image_id}.jpg")
    else:
        name = f"COCO_train2014_{image_id:012d}.jpg"
        # the refer layout (train2014/ itself or its parent), or a train2017 folder (same ids)
        candidates = (d / name, d / "train2014" / name, d / f"{image_id:012d}.jpg")
    return next((c for c in candidates if c.is_file()), None)


def _sentences(ref: dict) -> list:
    """The sentence strings of a ref (refer's dicts or plain strings); anything else is passed on as None so the
    writer drops and counts it (``text_empty``)."""
    return [s.get("sent") if isinstance(s, dict) else s if isinstance(s, str) else None for s in ref["sentences"]]


def _generalised_entry(ref: dict, anns: dict[int, dict]) -> dict | None:
    """The shard builder's view of a gRefCOCO ref: its targets' boxes and segmentations joined from
    instances.json by id (None when one of them is missing)."""
    targets = [anns.get(a) for a in ref["ann_ids"]]
    if any(t is None for t in targets):
        return None
    entry = {"ref_id": ref["ref_id"], "ann_ids": list(ref["ann_ids"]), "no_target": not targets,
             "category_ids": [t.get("category_id") for t in targets], "split": ref["split"],
             "bboxes": [t["bbox"] for t in targets], "sentences": _sentences(ref)}
    segs = [t.get("segmentation") for t in targets]
    if all(sg is not None for sg in segs):
        entry["segmentations"] = segs
    return entry


def refcoco_items(refer_root: str | Path, dataset: str, split_by: str, images_dir: str | Path, *,
                  exclude_ids: set[int] | None = None
                  ) -> tuple[dict[str, list[Item]], dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """Shard items per split: `(items_by_split, skips_by_split, counts_by_split)`.

    One Item per (split, image) holding all refs of that image in that split, in ref_id order; items are
    sorted by image_id. Each ref carries ref_id, ann_id, category_id, split, bbox and segmentation (from
    instances.json, joined by ann_id) and sentences (the tokenised `sent` strings). Refs whose annotation or
    image is missing are skipped and counted by reason; with `exclude_ids`, train refs on those images
    are dropped too (MDETR's "safe train" rule) and counted.
    """
    if dataset not in DATASETS:
        raise ReferFormatError(dataset, f"unknown dataset (expected one of {', '.join(DATASETS)})")
    if split_by not in SPLIT_BYS[dataset]:
        raise ReferFormatError(f"{dataset}/refs({split_by}).p",
                               f"{dataset} has no {split_by!r} split (expected {' or '.join(SPLIT_BYS[dataset])})")
    root = Path(refer_root)
    if not root.is_dir():
        raise ReferFormatError(root, "no such directory" if not root.exists() else "not a directory")
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise ReferFormatError(images_dir, "no such directory" if not images_dir.exists() else "not a directory")
    generalised = dataset in GENERALISED
    refs_file = grefs_path(root, dataset, split_by) if generalised else refs_path(root, dataset, split_by)
    refs = load_grefs(refs_file) if generalised else load_refs(refs_file)
    if generalised:
        refs = [{**r, "ann_ids": target_ann_ids(r)} for r in refs]
    inst_path = root / dataset / "instances.json"
    inst = load_instances(inst_path)
    anns = {a["id"]: a for a in inst["annotations"]}
    sizes = {im["id"]: (im["width"], im["height"]) for im in inst["images"]}

    skips: dict[str, Counter] = defaultdict(Counter)
    counts: dict[str, Counter] = defaultdict(Counter)
    refused: Counter = Counter()            # refs no split can hold (bad fields, duplicate ids), by reason
    usable, seen_ids = [], set()
    for ref in refs:
        why = ref_problem(ref)
        if why is None and ref["ref_id"] in seen_ids:
            why = "ref_duplicate_id"        # the first one is kept, never "last wins"
        if why:
            refused[why] += 1
            continue
        seen_ids.add(ref["ref_id"])
        usable.append(ref)
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for ref in sorted(usable, key=lambda r: r["ref_id"]):
        split, image_id = ref["split"], ref["image_id"]
        counts[split]["refs_in_file"] += 1
        counts[split]["sentences_in_file"] += len(ref["sentences"])
        if generalised:
            entry = _generalised_entry(ref, anns)
            if entry is None:
                skips[split]["ref_ann_missing"] += 1
                continue
            counts[split]["no_target_refs_in_file" if entry["no_target"] else
                          "multi_target_refs_in_file" if len(entry["ann_ids"]) > 1 else "one_target_refs_in_file"] += 1
            if exclude_ids and split == "train" and image_id in exclude_ids:
                skips[split]["ref_image_in_eval_split"] += 1
                continue
            groups[(split, image_id)].append(entry)
            continue
        ann = anns.get(ref["ann_id"])
        if ann is None:
            skips[split]["ref_ann_missing"] += 1
            continue
        if exclude_ids and split == "train" and image_id in exclude_ids:
            skips[split]["ref_image_in_eval_split"] += 1
            continue
        groups[(split, image_id)].append({
            "ref_id": ref["ref_id"], "ann_id": ref["ann_id"],
            "category_id": ref.get("category_id", ann.get("category_id")), "split": split,
            "bbox": ann["bbox"], "sentences": _sentences(ref), "segmentation": ann.get("segmentation")})
    if refused:
        print(f"warning: {refs_file}: refused {sum(refused.values())} ref(s): "
              + ", ".join(f"{k}={v}" for k, v in sorted(refused.items())), file=sys.stderr)
        for split in counts:
            counts[split].update({f"refused_{k}": v for k, v in refused.items()})
    if not usable:
        raise ReferFormatError(refs_file, "holds no usable ref (refused: "
                               + ", ".join(f"{k}={v}" for k, v in sorted(refused.items())) + ")")

    by_split: dict[str, list[Item]] = {s: [] for s in counts}
    for (split, image_id), split_refs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        counts[split]["images_in_file"] += 1
        path = image_path(images_dir, dataset, image_id)
        if path is None:
            skips[split]["ref_image_missing"] += len(split_refs)
            continue
        record = {"source": dataset, "image_id": str(image_id), "refs": split_refs}
        by_split[split].append(Item(make_key(dataset, image_id), str(path), record, sizes.get(image_id)))
    return (by_split, {s: dict(sorted(c.items())) for s, c in skips.items()},
            {s: dict(sorted(c.items())) for s, c in counts.items()})
