"""Aspect-ratio buckets: each photo is trained at the shape nearest its own instead of a square cut from it.

The buckets of a run at ``resolution`` are kohya's: every (height, width) with sides multiples of
:data:`BUCKET_STEP` between half and twice the resolution and no more pixels than the ``resolution`` square (so no
bucket needs more memory than the square), plus that square itself. A photo goes to the bucket whose aspect ratio is
nearest its own (compared as logarithms, so a portrait and the landscape of the same ratio are equally far from the
square), and is scaled to cover the bucket and cropped to it (``images.crop_to``). A square photo lands in the square
bucket: exactly what training without buckets does.

Class images have no bucket of their own: each step's class images are scaled and cropped to the shape of that
step's instance images (they are other members of the class; any crop of them serves the prior).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from .dataset import Example
from .images import upright_size

BUCKET_STEP = 64
"""Bucket sides are multiples of 64 pixels: 8 latent pixels at the VAE's factor 8 of every family trained here. SD 1.x
and 2.x halve their latents three times, so 64 px is what their UNet's levels divide exactly; it is kohya's default
and gives SDXL the buckets it was trained on (1024x1024, 1152x896, 1216x832, 1344x768, 1536x640 and the portraits)."""

Size = tuple[int, int]
"""(height, width) in pixels, as :class:`~dreambooth.models.conditioning.ImageGeometry` and tensors order them."""


def bucket_sizes(resolution: int) -> list[Size]:
    """The buckets at ``resolution``, sorted: the square ``resolution`` x ``resolution`` and every other shape with
    sides multiples of :data:`BUCKET_STEP` from half to twice ``resolution`` (at least one step) and at most
    ``resolution``² pixels, each as large as those bounds allow."""
    area = resolution * resolution
    smallest = max(BUCKET_STEP, math.ceil(resolution / 2 / BUCKET_STEP) * BUCKET_STEP)
    largest = 2 * resolution
    sizes = {(resolution, resolution)}
    for width in range(smallest, largest + 1, BUCKET_STEP):
        height = min(largest, area // width // BUCKET_STEP * BUCKET_STEP)
        if height >= smallest and height != width:
            sizes |= {(height, width), (width, height)}
    return sorted(sizes)


def nearest_bucket(size: Size, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is nearest that of ``size`` (log ratio; on a tie the larger, then the first)."""
    ratio = math.log(size[1] / size[0])
    return min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - ratio), -b[0] * b[1], b))


def assign_buckets(examples: Sequence[Example], resolution: int, enabled: bool) -> list[Example]:
    """``examples`` with their ``bucket`` set: the nearest of :func:`bucket_sizes` for each image's upright shape, or
    the ``resolution`` square for all when ``enabled`` is false."""
    if not enabled:
        return [replace(e, bucket=(resolution, resolution)) for e in examples]
    buckets = bucket_sizes(resolution)
    return [replace(e, bucket=nearest_bucket(upright_size(e.path), buckets)) for e in examples]


def latent_jobs(instance: Sequence[Example], classes: Sequence[Example]) -> list[tuple[Path, Size]]:
    """Every (image, shape) a run samples latents of: each instance image at its bucket, each class image at every
    bucket the instance images use."""
    used = sorted({e.bucket for e in instance if e.bucket is not None})
    return [(e.path, e.bucket) for e in instance] + [(c.path, size) for c in classes for size in used]


def describe_buckets(examples: Sequence[Example]) -> str:
    """``"512x512: 3 images, 448x576: 2 images"`` (width x height; the largest group first, then the widest)."""
    counts = sorted(Counter(e.bucket for e in examples).items(), key=lambda item: (-item[1], -item[0][1] / item[0][0]))
    return ", ".join(f"{w}x{h}: {n} image{'s' if n > 1 else ''}" for (h, w), n in counts)
