"""Seeded, captioned pictures of flat-coloured shapes: the world the demo model is trained on.

Every picture is one shape on a plain background, drawn with anti-aliased edges by pure tensor arithmetic
(no image library), so the same code draws a handful of instance images on a CPU and millions of
pretraining pictures on a GPU. Every shape is a polygon that is star-shaped around its centre, described by
``VERTICES`` boundary points; it is drawn as the union of the fan of triangles from the centre.

The base model's world: circles, squares, triangles and stars, each of one of the eight colours
(``BASE_COLOURS``), on a background of another. The DreamBooth subject lies outside it: a five-pointed star,
magenta on its left half and cyan on its right -- a particular object of a known class ("a shape"), made of
known parts, that the text-to-image model never saw: no pretraining picture has two colours. Its instance
word, ``INSTANCE_WORD``, never occurs in a pretraining caption either.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
}
BASE_COLOURS = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle", "star")
BASE_SHAPES = SHAPES
SUBJECT_COLOURS = ("magenta", "cyan")
INSTANCE_WORD = "zwx"
VERTICES = 60
STAR_INNER_RATIO = 0.45
IMAGE_SIZE = 64
# Circumradius ranges (1 = half the picture). A star needs room: at 8x downsampling the autoencoder rounds a
# star of radius under ~0.6 into a blob the judge reads as a square (0% survive at 0.38-0.45, 79% at 0.52-0.6,
# 93-96% from 0.6); circles, squares and triangles survive from 0.45 (97-100%).
SIZES: dict[str, tuple[float, float]] = {
    "circle": (0.45, 0.62),
    "square": (0.45, 0.62),
    "triangle": (0.45, 0.62),
    "star": (0.64, 0.76),
}

# Captions name any subset of (colour, shape, background); "shape" stands in for an unnamed kind.
CAPTION_TEMPLATES: tuple[tuple[str, float], ...] = (
    ("a {colour} {shape} on a {background} background", 0.50),
    ("a {colour} {shape}", 0.08),
    ("a {shape} on a {background} background", 0.08),
    ("a {shape}", 0.06),
    ("a {colour} shape on a {background} background", 0.08),
    ("a {colour} shape", 0.06),
    ("a shape on a {background} background", 0.06),
    ("a shape", 0.08),
)


@dataclass
class Scenes:
    """A batch of scene descriptions; tensors have the batch as their first dimension."""

    shape: list[str]
    colour: list[str]
    colour2: list[str]  # the right half's colour; equal to ``colour`` for one-colour shapes
    background: list[str]
    centre: torch.Tensor  # (B, 2) in [-1, 1] image units, x to the right, y downwards
    radius: torch.Tensor  # (B,) circumradius in the same units (1 = half the image width)
    rotation: torch.Tensor  # (B,) radians

    def __len__(self) -> int:
        return len(self.shape)


def sample_scenes(
    count: int,
    generator: torch.Generator,
    shapes: tuple[str, ...] = BASE_SHAPES,
    colours: tuple[str, ...] = BASE_COLOURS,
    backgrounds: tuple[str, ...] = BASE_COLOURS,
    radius_range: tuple[float, float] | None = None,
) -> Scenes:
    """``count`` random scenes: a shape of random kind, colour, size, place and turn; background of another colour.

    Sizes come from ``SIZES`` for each kind unless ``radius_range`` sets one range for all.
    """
    shape_index = torch.randint(len(shapes), (count,), generator=generator).tolist()
    colour_index = torch.randint(len(colours), (count,), generator=generator).tolist()
    background_draw = torch.randint(1 << 30, (count,), generator=generator).tolist()
    colour = [colours[i] for i in colour_index]
    background = []
    for c, r in zip(colour, background_draw):
        others = [b for b in backgrounds if b != c]
        background.append(others[r % len(others)])
    kinds = [shapes[i] for i in shape_index]
    ranges = [radius_range or SIZES[k] for k in kinds]
    return Scenes(kinds, colour, list(colour), background, *_placement(count, generator, ranges))


def sample_subject_scenes(
    count: int,
    generator: torch.Generator,
    backgrounds: tuple[str, ...] = ("white", "black", "blue", "yellow", "red"),
    radius_range: tuple[float, float] = SIZES["star"],
) -> Scenes:
    """Pictures of the DreamBooth subject (the two-tone star), upright give or take 10 degrees, varied backgrounds.

    Up to ``len(backgrounds)`` pictures each get their own background; more pictures draw them at random.
    """
    pick = _picker(generator)
    background = [backgrounds[i] if count <= len(backgrounds) else backgrounds[pick(len(backgrounds))]
                  for i in range(count)]
    centre, radius, _ = _placement(count, generator, [radius_range] * count)
    rotation = (torch.rand(count, generator=generator) - 0.5) * math.radians(20)
    return Scenes(["star"] * count, [SUBJECT_COLOURS[0]] * count, [SUBJECT_COLOURS[1]] * count, background,
                  centre, radius, rotation)


def captions(scenes: Scenes, generator: torch.Generator) -> list[str]:
    """One caption per scene, from a template drawn with ``CAPTION_TEMPLATES``' weights."""
    weights = torch.tensor([w for _, w in CAPTION_TEMPLATES])
    choice = torch.multinomial(weights, len(scenes), replacement=True, generator=generator).tolist()
    return [CAPTION_TEMPLATES[t][0].format(colour=c, shape=s, background=b)
            for t, c, s, b in zip(choice, scenes.colour, scenes.shape, scenes.background)]


def full_caption(colour: str, shape: str, background: str) -> str:
    """The caption that names everything: 'a red circle on a blue background'."""
    return CAPTION_TEMPLATES[0][0].format(colour=colour, shape=shape, background=background)


def render(scenes: Scenes, size: int = IMAGE_SIZE, device: torch.device | str = "cpu") -> torch.Tensor:
    """Draw the scenes as a float tensor (B, 3, size, size) with values in [0, 1]."""
    vertices = torch.stack([_outline(s) for s in scenes.shape]).to(device)  # (B, V, 2), unit circumradius
    cos, sin = scenes.rotation.cos().to(device), scenes.rotation.sin().to(device)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (B, 2, 2)
    vertices = torch.einsum("bij,bvj->bvi", rot, vertices) * scenes.radius.to(device)[:, None, None]
    vertices = vertices + scenes.centre.to(device)[:, None, :]
    centre = scenes.centre.to(device)
    grid = _pixel_centres(size, device)  # (P, 2)
    distance = _fan_distance(grid, centre, vertices)  # (B, P), negative inside
    alpha = (0.5 - distance / (2.0 / size)).clamp(0, 1)
    left = torch.tensor([COLOURS[c] for c in scenes.colour], device=device)
    right = torch.tensor([COLOURS[c] for c in scenes.colour2], device=device)
    background = torch.tensor([COLOURS[c] for c in scenes.background], device=device)
    on_right = (grid[None, :, 0] >= centre[:, None, 0]).unsqueeze(-1)  # (B, P, 1)
    fill = torch.where(on_right, right[:, None, :], left[:, None, :])
    image = background[:, None, :] * (1 - alpha[..., None]) + fill * alpha[..., None]
    return image.reshape(len(scenes), size, size, 3).permute(0, 3, 1, 2).contiguous()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) floats in [0, 1] to (B, H, W, 3) bytes, the layout PIL and the evaluator read."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def polygon_outlines(count: int, generator: torch.Generator) -> torch.Tensor:
    """Outlines (count, VERTICES, 2) of lumpy star-shaped polygons with 3 to 12 corners, and some circles."""
    corners = torch.randint(3, 13, (count,), generator=generator).tolist()
    circles = (torch.rand(count, generator=generator) < 0.15).tolist()
    outlines = []
    for k, circle in zip(corners, circles):
        radii = 0.35 + 0.65 * torch.rand(k, generator=generator)
        start = torch.rand(1, generator=generator).item() * 2 * math.pi
        if circle:
            outlines.append(_outline("circle"))
            continue
        angles = start + torch.arange(k) * (2 * math.pi / k)
        outlines.append(_resample(torch.stack([angles.cos(), angles.sin()], -1) * radii[:, None]))
    return torch.stack(outlines)


def random_polygons(count: int, generator: torch.Generator, outlines: torch.Tensor, size: int = IMAGE_SIZE,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Generic pictures for teaching the autoencoder: polygons drawn from ``outlines`` in random colours.

    No template, caption or subject: any RGB colour, half of them pure colours, 30% split in two halves.
    """
    pick = torch.randint(len(outlines), (count,), generator=generator)
    centre, radius, _ = _placement(count, generator, [(0.2, 0.7)] * count)
    centre, radius = centre.to(device), radius.to(device)
    vertices = outlines[pick].to(device) * radius[:, None, None] + centre[:, None, :]
    grid = _pixel_centres(size, device)
    alpha = (0.5 - _fan_distance(grid, centre, vertices) / (2.0 / size)).clamp(0, 1)[..., None]
    left, right, background, pure = (torch.rand(count, 1, 3, generator=generator).to(device) for _ in range(4))
    which = torch.rand(count, 3, 1, 1, generator=generator).to(device) < 0.5
    left = torch.where(which[:, 0], pure.round(), left)
    right = torch.where(which[:, 1], 1 - pure.round(), right)
    background = torch.where(which[:, 2], torch.rand(count, 1, 3, generator=generator).round().to(device), background)
    split = torch.rand(count, generator=generator).to(device) < 0.3
    right = torch.where(split[:, None, None], right, left)
    on_right = (grid[None, :, 0] >= centre[:, None, 0]).unsqueeze(-1)
    image = background * (1 - alpha) + torch.where(on_right, right, left) * alpha
    return image.reshape(count, size, size, 3).permute(0, 3, 1, 2).contiguous()


def _picker(generator: torch.Generator):
    return lambda n: int(torch.randint(n, (1,), generator=generator))


def _placement(count: int, generator: torch.Generator, ranges: list[tuple[float, float]]):
    low, high = torch.tensor(ranges, dtype=torch.float32).reshape(count, 2).unbind(1)
    radius = low + (high - low) * torch.rand(count, generator=generator)
    room = (0.95 - radius).clamp(min=0)
    centre = (torch.rand(count, 2, generator=generator) * 2 - 1) * room[:, None]
    rotation = torch.rand(count, generator=generator) * 2 * math.pi
    return centre, radius, rotation


@functools.cache
def _outline(shape: str) -> torch.Tensor:
    """``VERTICES`` boundary points (unit circumradius, first corner pointing up) of one kind of shape."""
    if shape == "circle":
        angles = -math.pi / 2 + torch.arange(VERTICES) * (2 * math.pi / VERTICES)
        return torch.stack([angles.cos(), angles.sin()], -1)
    if shape in ("square", "triangle"):
        corners = 4 if shape == "square" else 3
        angles = -math.pi / 2 + torch.arange(corners) * (2 * math.pi / corners)
        return _resample(torch.stack([angles.cos(), angles.sin()], -1))
    if shape == "star":
        angles = -math.pi / 2 + torch.arange(10) * (math.pi / 5)
        radii = torch.tensor([1.0, STAR_INNER_RATIO] * 5)
        return _resample(torch.stack([angles.cos(), angles.sin()], -1) * radii[:, None])
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _resample(corners: torch.Tensor) -> torch.Tensor:
    """The closed polygon through ``corners`` as ``VERTICES`` points, spread evenly over its edges."""
    k = corners.shape[0]
    per_edge = [VERTICES // k + (1 if i < VERTICES % k else 0) for i in range(k)]
    points = []
    for i, n in enumerate(per_edge):
        a, b = corners[i], corners[(i + 1) % k]
        t = torch.arange(n, dtype=torch.float32)[:, None] / n
        points.append(a + (b - a) * t)
    return torch.cat(points)


def _pixel_centres(size: int, device: torch.device | str) -> torch.Tensor:
    axis = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size * 2 - 1
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], -1)


def _fan_distance(grid: torch.Tensor, centre: torch.Tensor, vertices: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) from each pixel to the polygon's edge, measured in the pixel's sector.

    The polygon is star-shaped around ``centre``: the rays to consecutive vertices cut the plane into wedges, and
    inside wedge k the polygon is exactly the triangle (centre, vertex k, vertex k+1), so the distance to the
    line of edge k decides inside or outside. Pixels on a ray belong to both wedges and agree.
    """
    b = vertices
    c = torch.roll(vertices, -1, dims=1)
    rel_b = b - centre[:, None, :]
    rel_c = c - centre[:, None, :]
    rel_p = grid[None, None, :, :] - centre[:, None, None, :]  # (B, 1, P, 2)
    cross_b = rel_b[..., None, 0] * rel_p[..., 1] - rel_b[..., None, 1] * rel_p[..., 0]  # (B, V, P)
    cross_c = rel_p[..., 0] * rel_c[..., None, 1] - rel_p[..., 1] * rel_c[..., None, 0]
    turn = (rel_b[..., 0] * rel_c[..., 1] - rel_b[..., 1] * rel_c[..., 0]).sign()[..., None]
    in_wedge = (cross_b * turn >= -1e-6) & (cross_c * turn >= -1e-6)
    direction = c - b
    normal = torch.stack([direction[..., 1], -direction[..., 0]], -1)
    normal = normal / normal.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    flip = ((centre[:, None, :] - b) * normal).sum(-1, keepdim=True) > 0
    normal = torch.where(flip, -normal, normal)  # pointing away from the centre
    distance = torch.einsum("pd,bvd->bvp", grid, normal) - (b * normal).sum(-1)[..., None]
    return torch.where(in_wedge, distance, torch.full_like(distance, float("inf"))).amin(dim=1)
