"""Small raw inputs for the shard tests: photo-like JPEGs and minimal COCO/VG files written in the tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth gradient with blobs and mild noise (encodes like a photo, unlike a flat colour)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / width * 200, y / height * 200, (x + y) / (width + height) * 255], -1)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(10, max(12, width / 4))
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def write_jpeg(path: Path, width: int, height: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    photo(width, height, seed).save(path, quality=90)
    return path


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def tiny_coco(root: Path, n: int = 6, size: tuple[int, int] = (320, 240), captions_per_image: int = 2
              ) -> tuple[Path, Path, Path]:
    """``root/images/%012d.jpg`` + captions and instances files for ``n`` images; returns the three paths."""
    images, caps, objs = [], [], []
    for i in range(1, n + 1):
        write_jpeg(root / "images" / f"{i:012d}.jpg", *size, seed=i)
        images.append({"id": i, "file_name": f"{i:012d}.jpg", "width": size[0], "height": size[1]})
        caps += [{"id": 100 * i + j, "image_id": i, "caption": f" picture {i} number {j} \n"}
                 for j in range(captions_per_image)]
        objs.append({"id": 1000 + i, "image_id": i, "category_id": 3, "bbox": [10, 20, 50, 40],
                     "area": 2000, "iscrowd": 0, "segmentation": [[10, 20, 60, 20, 60, 60, 10, 60]]})
    cap_file = write_json(root / "captions.json", {"info": {}, "licenses": [], "images": images, "annotations": caps})
    inst_file = write_json(root / "instances.json", {"info": {}, "licenses": [], "images": images, "annotations": objs,
                                                     "categories": [{"id": 3, "name": "car ", "supercategory": "v"}]})
    return root / "images", cap_file, inst_file


class SeenObject:
    """An object of a synthetic scene as a reader of the written files sees it: shape from the category name, colour
    from the pixels, size class from the box, position from the box (what shards.synthetic_text resolves against)."""

    def __init__(self, shape: str, color: str, size: str, bbox: list[float]):
        self.shape, self.color, self.size, self.bbox = shape, color, size, bbox

    @property
    def center(self) -> tuple[float, float]:
        x, y, w, h = self.bbox
        return x + w / 2, y + h / 2
