"""Procedurally drawn stand-ins for photos of loaves of bread and corgi butts.

These images are the built-in data set of the demo and the fixtures of the tests. The label is
carried by the object's shape alone: object and background colours come from one distribution
shared by every class, so a model must look at structure, not at the mean colour.
"""

from __future__ import annotations

import colorsys
import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dogbread.errors import ConfigError

# Landscape, square and portrait frames, so loaders cannot assume one size or aspect ratio.
SIZES = ((200, 150), (256, 256), (320, 240), (240, 320), (480, 360), (640, 480))

Rgb = tuple[int, int, int]


def _luma(rgb: Rgb) -> float:
    return (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) / 255


def _random_colour(rng: np.random.Generator) -> Rgb:
    h, s, v = rng.random(), rng.uniform(0.1, 0.9), rng.uniform(0.15, 0.95)
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return round(r * 255), round(g * 255), round(b * 255)


def _colour_pair(rng: np.random.Generator) -> tuple[Rgb, Rgb]:
    # Both colours are drawn i.i.d. and the contrast test is symmetric, so object and background
    # colours have the same distribution: the mean colour of an image says nothing of its class.
    while True:
        a, b = _random_colour(rng), _random_colour(rng)
        if abs(_luma(a) - _luma(b)) >= 0.25:
            return a, b


def _mix(rgb: Rgb, target: float, amount: float) -> Rgb:
    r, g, b = (round(c + (target - c) * amount) for c in rgb)
    return r, g, b


def _jitter(rgb: Rgb, rng: np.random.Generator, spread: float) -> np.ndarray:
    return np.clip(np.array(rgb, np.float32) + rng.normal(0, spread, 3), 0, 255)


def _background(w: int, h: int, colour: Rgb, rng: np.random.Generator) -> Image.Image:
    if rng.random() < 0.4:  # a flat wall or tablecloth
        return Image.new("RGB", (w, h), colour)
    # A coarse grid of colours, smoothly upscaled: cheap, and any size comes out the same way.
    # Gentle on purpose: the object, not the background, should hold the strongest edges.
    gw, gh = int(rng.integers(2, 6)), int(rng.integers(2, 6))
    if rng.random() < 0.5:  # a linear gradient in a random direction, like uneven lighting
        angle = rng.uniform(0, 2 * math.pi)
        t = np.add.outer(np.linspace(0, math.sin(angle), gh), np.linspace(0, math.cos(angle), gw))
        t = ((t - t.min()) / max(float(np.ptp(t)), 1e-6))[..., None]
        grid = _jitter(colour, rng, 12) * (1 - t) + _jitter(colour, rng, 20) * t
    else:  # low-frequency blotches
        grid = np.stack([_jitter(colour, rng, 12) for _ in range(gw * gh)]).reshape(gh, gw, 3)
    small = Image.fromarray(np.round(grid).astype(np.uint8))
    return small.resize((w, h), Image.Resampling.BILINEAR)


Points = list[tuple[float, float]]


def _arc(cx: float, cy: float, rx: float, ry: float, start: float, end: float, n: int) -> Points:
    return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in np.linspace(start, end, n)]


def _ellipse(cx: float, cy: float, rx: float, ry: float | None = None) -> Points:
    return _arc(cx, cy, rx, rx if ry is None else ry, 0, 2 * math.pi, 49)[:-1]


def _rounded_rect(x0: float, y0: float, x1: float, y1: float, r: float) -> Points:
    corners = ((x1 - r, y1 - r), (x0 + r, y1 - r), (x0 + r, y0 + r), (x1 - r, y0 + r))
    points: Points = []
    for k, (cx, cy) in enumerate(corners):
        points += _arc(cx, cy, r, r, k * math.pi / 2, (k + 1) * math.pi / 2, 10)
    return points


class _Pen:
    """Draws in the object's own coordinates: a [-1, 1] box, then rotated, scaled and placed.

    Everything is a polygon or a polyline so rotation is exact and costs nothing; rotating a
    drawn layer instead was the slowest step of the whole generator.
    """

    def __init__(
        self,
        canvas: Image.Image,
        centre: tuple[float, float],
        unit: float,
        degrees: float,
        colour: Rgb,
    ) -> None:
        self.draw = ImageDraw.Draw(canvas)
        self.cx, self.cy = centre
        self.unit = unit
        self.cos, self.sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
        self.colour = colour
        # The detail colour (scores, tuft, paws) and the outline derive from the object colour
        # the same way for every class, so they carry no label information either. The outline
        # is thick enough to survive shrinking the image to 64 pixels.
        self.detail = _mix(colour, 255 if _luma(colour) < 0.5 else 0, 0.65)
        self.outline = _mix(colour, 0, 0.55)
        self.outline_width = max(2, round(0.06 * unit))

    def _map(self, points: Points) -> Points:
        c, s, u = self.cos, self.sin, self.unit
        return [(self.cx + u * (x * c - y * s), self.cy + u * (x * s + y * c)) for x, y in points]

    def fill(self, points: Points, colour: Rgb | None = None, outline: bool = True) -> None:
        line = self.outline if outline else None
        self.draw.polygon(self._map(points), colour or self.colour, line, self.outline_width)

    def stroke(self, points: Points, width: float, colour: Rgb | None = None) -> None:
        pixels = max(2, round(width * self.unit))
        self.draw.line(self._map(points), colour or self.colour, pixels, joint="curve")


def _bread(pen: _Pen, rng: np.random.Generator) -> None:
    # A long loaf, 2.5-3.2 times as long as it is tall, with bold parallel score slashes on top.
    # Its area matches the corgi's, so the amount of object colour does not give the label away.
    b = rng.uniform(0.34, 0.44)
    pen.fill(_rounded_rect(-1.1, -b, 1.1, b, b * rng.uniform(0.7, 1.0)))
    slant = rng.choice([-1, 1]) * rng.uniform(0.25, 0.5) * b
    for x in (-0.55, 0, 0.55):
        pen.stroke([(x - slant, -0.5 * b), (x + slant, 0.5 * b)], 0.12, pen.detail)


def _dog(pen: _Pen, rng: np.random.Generator) -> None:
    # A corgi from behind: two thick short legs, two big round cheeks side by side with a cleft
    # between them, and a fluffy tail tuft on top. About as tall as it is wide.
    r = rng.uniform(0.42, 0.47)
    s = r * rng.uniform(0.82, 0.92)  # cheek centres closer than 2r, so the cheeks overlap
    leg, leg_x = rng.uniform(0.16, 0.2), s * rng.uniform(0.85, 1.0)
    bottom = r * rng.uniform(1.8, 2.0)
    for x in (-leg_x, leg_x):
        pen.fill(_rounded_rect(x - leg, 0, x + leg, bottom, 0.6 * leg))
        paw = _rounded_rect(x - leg, bottom - leg, x + leg, bottom, 0.5 * leg)
        pen.fill(paw, pen.detail, outline=False)
    for x in (-s, s):
        pen.fill(_ellipse(x, 0, r))
    half_lens = math.sqrt(r * r - s * s)  # half the height of the overlap of the cheeks
    pen.stroke([(0, -0.2 * half_lens), (0, 1.1 * half_lens)], 0.09, pen.detail)
    tuft_y = -0.95 * r
    for _ in range(int(rng.integers(6, 9))):
        x, y = rng.uniform(-0.15, 0.15), tuft_y + rng.uniform(-0.12, 0.05)
        pen.fill(_ellipse(x, y, rng.uniform(0.12, 0.18)), pen.detail, outline=False)


def _triangle(pen: _Pen, rng: np.random.Generator) -> None:
    pen.fill(_arc(0, 0, 0.95, 0.95, -math.pi / 2, 1.5 * math.pi, 4)[:-1])


def _ring(pen: _Pen, rng: np.random.Generator) -> None:
    circle = _ellipse(0, 0, 0.75)
    pen.stroke([*circle, *circle[:2]], 0.32)  # overlapping the ends hides the seam


def _star(pen: _Pen, rng: np.random.Generator) -> None:
    outer = _arc(0, 0, 0.95, 0.95, -math.pi / 2, 1.5 * math.pi, 11)[:-1]
    inner = _arc(0, 0, 0.4, 0.4, -math.pi / 2, 1.5 * math.pi, 11)[:-1]
    pen.fill([outer[k] if k % 2 == 0 else inner[k] for k in range(10)])


def _turn(points: Points, quarter_turns: int) -> Points:
    for _ in range(quarter_turns):
        points = [(-y, x) for x, y in points]
    return points


def _cross(pen: _Pen, rng: np.random.Generator) -> None:
    w, n = 0.25, 0.9
    arm = [(-w, -n), (w, -n), (w, -w)]  # one arm; the other three are it turned by 90 degrees
    pen.fill([p for k in range(4) for p in _turn(arm, k)])


Shape = Callable[[_Pen, np.random.Generator], None]

# (shape, largest rotation in degrees). Bread and corgi both stay roughly level, as in most
# photos, so the loaf's length and the corgi's legs-below-cheeks layout stay easy to see.
_CLASSES: tuple[tuple[Shape, float], ...] = ((_bread, 25), (_dog, 25))
_EXTRA: tuple[tuple[Shape, float], ...] = ((_triangle, 180), (_ring, 0), (_star, 180), (_cross, 45))


def _shape_for(class_index: int) -> tuple[Shape, float]:
    if class_index < 0:
        raise ValueError(f"class_index must be >= 0, got {class_index}")
    if class_index < len(_CLASSES):
        return _CLASSES[class_index]
    return _EXTRA[(class_index - len(_CLASSES)) % len(_EXTRA)]


def draw_image(class_index: int, rng: np.random.Generator) -> Image.Image:
    """One procedurally drawn RGB image of the class with that index.

    0 is a loaf of bread, 1 a corgi butt; higher indexes cycle through a triangle, a ring, a star
    and a cross. All randomness comes from `rng`, so the same generator state gives the same image.
    """
    shape, max_rotation = _shape_for(class_index)
    w, h = SIZES[rng.integers(len(SIZES))]
    back, front = _colour_pair(rng)
    canvas = _background(w, h, back, rng)

    # The object is big and near the middle: the loaf's length or the corgi's width is 55-85% of
    # the short side of the frame, so its outline survives shrinking the image to 64 pixels.
    unit = rng.uniform(0.3, 0.38) * min(w, h)
    slack = 0.08 * min(w, h)
    centre = w / 2 + rng.uniform(-slack, slack), h / 2 + rng.uniform(-slack, slack)
    degrees = rng.uniform(-max_rotation, max_rotation)
    shape(_Pen(canvas, centre, unit, degrees, front), rng)

    if rng.random() < 0.2:  # a slightly out-of-focus camera
        canvas = canvas.filter(ImageFilter.BoxBlur(rng.uniform(0.5, 1.0)))
    # Sensor noise. Blending in uniform random bytes (std up to ~4 levels; it also washes out
    # contrast a little) runs in C: Gaussian noise in numpy took longer than the whole drawing.
    noise = Image.frombytes("RGB", (w, h), rng.bytes(w * h * 3))
    return Image.blend(canvas, noise, rng.uniform(0.0, 0.05))


def _check_classes(classes: tuple[str, ...]) -> None:
    if not classes:
        raise ConfigError("classes must name at least one class")
    if len(set(classes)) != len(classes):
        raise ConfigError(f"classes must be distinct, got {list(classes)}")
    for name in classes:
        # Each name becomes a folder under `out`; it must not climb out of it or nest.
        if not name or name in (".", "..") or any(ch in name for ch in "/\\\0"):
            raise ConfigError(f"class name {name!r} cannot be used as a folder name")


def write_synthetic_tree(
    out: str | Path,
    per_class: int,
    seed: int = 0,
    classes: Sequence[str] = ("bread", "dog"),
) -> dict[str, int]:
    """Writes out/<class>/<class>_<i:05d>.jpg for each class; returns {class: count}.

    Deterministic for a seed. Never deletes or overwrites anything that isn't its own output
    (it may overwrite its own file names). The shape of a class depends on its position in
    `classes`, not on its name (see `draw_image`). Writes to a local folder only.
    """
    classes = tuple(classes)
    _check_classes(classes)
    if per_class < 0:
        raise ConfigError(f"per_class must be >= 0, got {per_class}")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    root = Path(out)
    counts: dict[str, int] = {}
    for index, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            # One generator per image, so image i is the same however many images are requested.
            # spawn_key is numpy's way to derive independent streams; a plain [seed, index, i]
            # list would not do: numpy drops its trailing zeros and splits seeds over 32 bits.
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, i)))
            image = draw_image(index, rng)
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=int(rng.integers(60, 96)))
            path = folder / f"{name}_{i:05d}.jpg"
            # A symlink or folder at our file name is someone else's: writing through it would
            # clobber a file we did not create.
            if path.is_symlink() or (path.exists() and not path.is_file()):
                raise ConfigError(f"{path} exists and is not a file; refusing to overwrite it")
            path.write_bytes(buffer.getvalue())
        counts[name] = per_class
    return counts
