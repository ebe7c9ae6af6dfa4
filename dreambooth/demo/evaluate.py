"""Score a picture of a shape by pixel statistics alone: background, shape colours, kind of shape.

No learned weights, so the score is the same on every machine and cannot be fooled by the model it judges.
Steps: every pixel takes the nearest of the eight pure colours (the corners of the RGB cube, ``COLOURS``);
the background is the commonest colour on the border; the shape is the largest connected region of the
other pixels; its colours are the histogram of its pixels; its kind comes from two rotation-free numbers:
solidity (area over convex-hull area: a star is far from convex) and fill (area over the circle through its
farthest point: circle 1, square 0.64, triangle 0.41).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .shapes import COLOURS, SUBJECT_COLOURS

_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _NAMES], dtype=np.float32) * 255
MIN_AREA = 24  # pixels; smaller regions are specks, not shapes
SECOND_COLOUR_SHARE = 0.2  # a second colour this common makes a two-tone shape
# Thresholds set from the shipped autoencoder's reconstructions of rendered scenes (not from model samples):
# solidity -- triangles 0.84-0.92, squares 0.91-0.97, circles 0.95-0.97, subject-sized stars 0.72-0.83;
# fill -- triangles 0.45-0.56, squares 0.66-0.78, circles 0.83-0.93.
STAR_SOLIDITY = 0.84
CIRCLE_FILL = 0.80
SQUARE_FILL = 0.565


@dataclass
class Verdict:
    """What the evaluator sees in one picture."""

    shape: str  # circle, square, triangle, star or "none"
    colour: str  # the shape's commonest colour ("none" if no shape)
    background: str
    colour_shares: dict[str, float] = field(default_factory=dict)
    solidity: float = 0.0
    fill: float = 0.0

    @property
    def is_subject(self) -> bool:
        """The DreamBooth subject: a star whose two commonest colours are magenta and cyan."""
        top = sorted(self.colour_shares, key=self.colour_shares.get, reverse=True)[:2]
        return (self.shape == "star" and set(top) == set(SUBJECT_COLOURS)
                and min(self.colour_shares.get(c, 0.0) for c in SUBJECT_COLOURS) >= SECOND_COLOUR_SHARE)


def judge(image: np.ndarray) -> Verdict:
    """The verdict on one (H, W, 3) uint8 picture."""
    labels = _nearest_colour(image)
    background = _border_mode(labels)
    mask = _largest_region(labels != background)
    if mask.sum() < MIN_AREA:
        return Verdict("none", "none", _NAMES[background])
    counts = Counter(labels[mask].tolist())
    total = sum(counts.values())
    shares = {_NAMES[k]: v / total for k, v in counts.most_common()}
    colour = next(iter(shares))
    solidity, fill = _solidity_and_fill(mask)
    return Verdict(_classify(solidity, fill), colour, _NAMES[background], shares, solidity, fill)


def judge_batch(images: np.ndarray) -> list[Verdict]:
    """Verdicts on a (B, H, W, 3) uint8 batch."""
    return [judge(image) for image in images]


def _classify(solidity: float, fill: float) -> str:
    if solidity < STAR_SOLIDITY:
        return "star"
    if fill > CIRCLE_FILL:
        return "circle"
    if fill > SQUARE_FILL:
        return "square"
    return "triangle"


def _nearest_colour(image: np.ndarray) -> np.ndarray:
    pixels = image.astype(np.float32)[..., None, :]  # (H, W, 1, 3)
    return ((pixels - _PALETTE) ** 2).sum(-1).argmin(-1)


def _border_mode(labels: np.ndarray) -> int:
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    return int(np.bincount(border, minlength=len(_NAMES)).argmax())


def _largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of ``mask``, by union-find over rows (pure numpy, 64x64 in a millisecond)."""
    h, w = mask.shape
    parent = np.arange(h * w)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    ys, xs = np.nonzero(mask)
    for y, x in zip(ys.tolist(), xs.tolist()):
        i = y * w + x
        if x > 0 and mask[y, x - 1]:
            parent[find(i)] = find(i - 1)
        if y > 0 and mask[y - 1, x]:
            a, b = find(i), find(i - w)
            parent[a] = b
    if len(ys) == 0:
        return mask
    roots = np.array([find(y * w + x) for y, x in zip(ys.tolist(), xs.tolist())])
    best = np.bincount(roots).argmax()
    out = np.zeros_like(mask)
    out[ys[roots == best], xs[roots == best]] = True
    return out


def _solidity_and_fill(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    hull = _convex_hull(np.unique(corners, axis=0).astype(np.float64))
    hull_area = _polygon_area(hull)
    area = float(len(xs))
    centre = np.array([xs.mean() + 0.5, ys.mean() + 0.5])
    reach = np.sqrt(((hull - centre) ** 2).sum(1)).max()
    return area / max(hull_area, 1.0), area / (np.pi * reach**2)


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Andrew's monotone chain; ``points`` sorted and unique."""
    order = np.lexsort((points[:, 1], points[:, 0]))
    pts = points[order].tolist()

    def half(sequence: list) -> list:
        chain: list = []
        for p in sequence:
            while len(chain) >= 2 and _cross(chain[-2], chain[-1], p) <= 0:
                chain.pop()
            chain.append(p)
        return chain

    lower, upper = half(pts), half(pts[::-1])
    return np.array(lower[:-1] + upper[:-1])


def _cross(o: list, a: list, b: list) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _polygon_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
