"""Procedural CLEVR-Ref+-like scenes: coloured shapes on varied backgrounds, drawn with PIL/numpy.

A `Scene` is the ground truth every synthetic raw format is written from (shards.synthetic): each object's
shape, colour, size class and the exact polygon that was filled, so the polygon *is* the mask. Sizes keep
every object at least ~1/6 of the shorter image side and objects never overlap, so boxes and masks are
clean targets for a small grounding model. Colours are saturated and backgrounds muted (low saturation),
so colour words are visually unambiguous.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 40, 40),
    "green": (46, 168, 64),
    "blue": (40, 86, 214),
    "yellow": (238, 212, 44),
    "purple": (146, 64, 190),
    "orange": (246, 138, 28),
}
SIZES = ("small", "large")
# Extent (longer bbox side) as a fraction of the shorter image side, per size class. The gap between the
# classes (0.21 .. 0.30) lets a reader tell them apart from the box alone (threshold SIZE_THRESHOLD).
SIZE_RANGE = {"small": (0.17, 0.21), "large": (0.30, 0.36)}
SIZE_THRESHOLD = 0.255
BACKGROUNDS = ("gradient", "noise", "stripes", "checker")
IMAGE_SIZES = ((256, 192), (192, 256), (224, 224), (256, 256), (240, 180), (200, 160), (160, 200))


@dataclass(frozen=True)
class Obj:
    """One drawn shape. `polygon` is flat [x1, y1, x2, y2, ...] in pixels (COCO polygon convention)."""

    shape: str
    color: str
    size: str
    rgb: tuple[int, int, int]
    polygon: tuple[float, ...]

    @property
    def bbox(self) -> list[float]:
        """[x, y, w, h] of the polygon."""
        xs, ys = self.polygon[0::2], self.polygon[1::2]
        x0, y0 = min(xs), min(ys)
        return [round(x0, 2), round(y0, 2), round(max(xs) - x0, 2), round(max(ys) - y0, 2)]

    @property
    def center(self) -> tuple[float, float]:
        x, y, w, h = self.bbox
        return x + w / 2, y + h / 2

    @property
    def label(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    """Ground truth of one image: size, background description and the objects (no overlaps)."""

    width: int
    height: int
    background: str                       # one of BACKGROUNDS
    tone: str                             # "light" | "dark": background brightness word used in captions
    objects: list[Obj] = field(default_factory=list)
    crowd: list[Obj] = field(default_factory=list)  # tiny clustered dots annotated as one iscrowd region

    @property
    def side(self) -> int:
        return min(self.width, self.height)


def _unit_polygon(shape: str, rng: np.random.Generator) -> np.ndarray:
    """Vertices (N, 2) of a shape around the origin, with a little rotation jitter (never enough to turn a
    square into a diamond)."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
        return pts
    if shape == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float)
    elif shape == "diamond":
        pts = np.array([[0, -1.3], [1, 0], [0, 1.3], [-1, 0]], float)
    elif shape == "triangle":
        t = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif shape == "star":
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    a = math.radians(float(rng.uniform(-8, 8)))
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return pts @ rot.T


def _place(shape: str, extent: float, cx: float, cy: float, rng: np.random.Generator) -> tuple[float, ...]:
    pts = _unit_polygon(shape, rng)
    lo, hi = pts.min(0), pts.max(0)
    pts = (pts - (lo + hi) / 2) * (extent / float((hi - lo).max()))
    pts = pts + np.array([cx, cy])
    return tuple(round(float(v), 2) for v in pts.reshape(-1))


def _boxes_clear(a: list[float], b: list[float], gap: float) -> bool:
    return (a[0] + a[2] + gap <= b[0] or b[0] + b[2] + gap <= a[0]
            or a[1] + a[3] + gap <= b[1] or b[1] + b[3] + gap <= a[1])


def _fits(poly: tuple[float, ...], width: int, height: int, others: list[Obj], gap: float) -> bool:
    xs, ys = poly[0::2], poly[1::2]
    if min(xs) < 2 or min(ys) < 2 or max(xs) > width - 3 or max(ys) > height - 3:
        return False
    box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
    return all(_boxes_clear(box, o.bbox, gap) for o in others)


def _jitter_rgb(color: str, rng: np.random.Generator) -> tuple[int, int, int]:
    base = np.array(COLORS[color])
    return tuple(int(v) for v in np.clip(base + rng.integers(-10, 11, 3), 0, 255))


def sample_scene(rng: np.random.Generator, n_objects: int | None = None, *, crowd: bool = False,
                 size: tuple[int, int] | None = None) -> Scene:
    """Draw a random scene description: 2-6 non-overlapping shapes; about a third of them repeat the shape
    and colour of an earlier one, so that relations and superlatives are needed to tell them apart."""
    width, height = size or IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
    while True:  # a crowded draw can leave fewer than two shapes placed: draw again
        scene = _sample_objects(rng, width, height, n_objects)
        if len(scene.objects) >= 2:
            break
    if crowd:
        _add_crowd(scene, rng)
    return scene


def _sample_objects(rng: np.random.Generator, width: int, height: int, n_objects: int | None) -> Scene:
    scene = Scene(width, height, BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))],
                  "dark" if rng.random() < 0.4 else "light")
    n = int(n_objects if n_objects is not None else rng.integers(2, 7))
    s, gap = scene.side, 0.04 * scene.side
    for _ in range(n):
        if scene.objects and rng.random() < 0.35:
            twin = scene.objects[int(rng.integers(len(scene.objects)))]
            shape, color = twin.shape, twin.color
        else:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            color = list(COLORS)[int(rng.integers(len(COLORS)))]
        for attempt in range(60):
            # Fall back to small shapes when a crowded scene has no room left for a large one.
            size_cls = SIZES[int(rng.integers(2))] if attempt < 30 else "small"
            extent = float(rng.uniform(*SIZE_RANGE[size_cls])) * s
            cx = float(rng.uniform(extent / 2 + 2, width - extent / 2 - 3))
            cy = float(rng.uniform(extent / 2 + 2, height - extent / 2 - 3))
            poly = _place(shape, extent, cx, cy, rng)
            if _fits(poly, width, height, scene.objects, gap):
                scene.objects.append(Obj(shape, color, size_cls, _jitter_rgb(color, rng), poly))
                break
    return scene


def _add_crowd(scene: Scene, rng: np.random.Generator) -> None:
    """A cluster of 4 small same-coloured dots in free space (COCO's iscrowd case); best effort."""
    s = scene.side
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    dot = 0.07 * s
    for _ in range(200):
        cx = float(rng.uniform(0.12 * s, scene.width - 0.12 * s))
        cy = float(rng.uniform(0.12 * s, scene.height - 0.12 * s))
        offs = [(-1, -1), (1, -1), (-1, 1), (1, 1)]
        dots = [_place("circle", dot, cx + ox * 0.05 * s, cy + oy * 0.05 * s, rng) for ox, oy in offs]
        if all(_fits(d, scene.width, scene.height, scene.objects, 0.03 * s) for d in dots):
            scene.crowd = [Obj("circle", color, "small", _jitter_rgb(color, rng), d) for d in dots]
            return


def _background(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """A muted (low-saturation) background of the scene's kind, float32 HxWx3."""
    h, w = scene.height, scene.width
    grey = rng.uniform(45, 105) if scene.tone == "dark" else rng.uniform(150, 215)
    base = grey + rng.uniform(-14, 14, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = scene.background
    if kind == "gradient":
        a = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(a) * xx / w + np.sin(a) * yy / h)[..., None]
        other = base + rng.uniform(-35, 35) + rng.uniform(-10, 10, 3)
        img = base + (other - base) * (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    elif kind == "noise":
        img = (base + 14 * rng.standard_normal((h, w, 1), dtype=np.float32)
               + 4 * rng.standard_normal((h, w, 3), dtype=np.float32))
    elif kind == "stripes":
        a, period = rng.uniform(0, np.pi), rng.uniform(10, 28)
        phase = (np.cos(a) * xx + np.sin(a) * yy) / period
        img = base + (np.floor(phase) % 2)[..., None] * rng.uniform(12, 24)
    else:  # checker
        cell = int(rng.integers(12, 32))
        img = base + (((xx // cell) + (yy // cell)) % 2)[..., None] * rng.uniform(12, 24)
    return np.broadcast_to(img, (h, w, 3)).astype(np.float32)


def polygon_mask(polygon: tuple[float, ...], width: int, height: int) -> np.ndarray:
    """Boolean HxW mask of one filled polygon (what the drawing fills)."""
    m = Image.new("L", (width, height), 0)
    ImageDraw.Draw(m).polygon(list(polygon), fill=1)
    return np.asarray(m, dtype=bool)


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Rasterise a scene: background, then each object filled flat with a faint shading and sensor noise."""
    img = _background(scene, rng).copy()
    for obj in scene.objects + scene.crowd:
        m = polygon_mask(obj.polygon, scene.width, scene.height)
        x, y, w, h = obj.bbox
        yy, xx = np.nonzero(m)
        # A gentle top-left light: +-6 levels across the object, never enough to change the colour name.
        shade = 6 * (1 - ((xx - x) / max(w, 1) + (yy - y) / max(h, 1)))
        img[yy, xx] = np.array(obj.rgb, np.float32) + shade[:, None]
    img += 3 * rng.standard_normal(img.shape, dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")
