"""A DreamBooth dataset of the issue's shape: 10 instance + 200 class images, JPEG, from a seed.

Instance images are 768 px (like photos, so resizing is real work); class images are 512 px (what a class-image
generator writes). Each is a smooth random colour field with fine noise, so JPEG decoding and the VAE see
ordinary image statistics. 200 class images make an epoch 200 steps long at batch 1, so the reference's data
loader does not restart every few steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def _image(rng: np.random.Generator, size: int) -> Image.Image:
    coarse = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def build_dataset(root: Path, instance: int = 10, classes: int = 200, seed: int = 0,
                  sizes: tuple[int, int] = (768, 512)) -> tuple[Path, Path]:
    """Write ``root/instance`` and ``root/class`` (kept when already complete; ``sizes``: their pictures' sides in
    pixels); returns both folders."""
    root = Path(root)
    folders = (root / "instance", root / "class")
    rng = np.random.default_rng(seed)
    for folder, count, size in zip(folders, (instance, classes), sizes):
        if folder.is_dir() and len(list(folder.glob("*.jpg"))) == count:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            _image(rng, size).save(folder / f"{i:04d}.jpg", quality=95)
    return folders
