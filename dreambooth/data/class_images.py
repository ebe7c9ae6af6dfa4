"""Class images for prior preservation: the user's own, topped up with images the base model generates.

Generated images live in ``<model>/class_images/<key>/``, the key naming the base model, class prompt,
negative prompt and size, so the next run with the same settings reuses them and only the missing count is
generated. Each image has its own seed (``class_seed + n``), so a generation cut short continues identically.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import Concept
from ..fileio import write_atomic
from .images import IMAGE_EXTENSIONS, list_images


def class_image_folder(root: Path, source_id: str, concept: Concept, resolution: int) -> Path:
    """``root/<readable prompt>-<hash of model, prompts, size>``."""
    identity = "\n".join([source_id, concept.class_prompt, concept.class_negative_prompt, str(resolution)])
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    readable = re.sub(r"[^A-Za-z0-9]+", "_", concept.class_prompt).strip("_")[:40] or "class"
    return root / f"{readable}-{resolution}-{digest}"


def existing_class_images(concept: Concept, folder: Path) -> list[Path]:
    """The user's class images (if a folder is given) followed by previously generated ones.

    A class folder that exists but is empty counts as zero images: all of them are then generated.
    """
    paths = []
    if concept.class_dir and not _is_empty_folder(Path(concept.class_dir)):
        paths = list_images(concept.class_dir, "class images")
    if folder.is_dir():
        paths += sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    return paths


def generate_class_images(
    pipeline_factory: Callable[[], object],
    concept: Concept,
    folder: Path,
    count: int,
    resolution: int,
    batch_size: int,
    device: torch.device,
    progress: Callable[[int, int], None],
    cancelled: Callable[[], bool],
) -> list[Path]:
    """Generate ``count`` images into ``folder``, numbered after those already there; returns the new files."""
    folder.mkdir(parents=True, exist_ok=True)
    first = len([p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS])
    prompt = concept.class_prompt.replace("[filewords]", "").strip()
    pipeline = pipeline_factory()
    made: list[Path] = []
    for start in range(0, count, batch_size):
        if cancelled():
            break
        numbers = range(first + start, first + min(start + batch_size, count))
        generators = [torch.Generator(device="cpu").manual_seed(concept.class_seed + n) for n in numbers]
        images = pipeline(
            prompt=[prompt] * len(numbers),
            negative_prompt=[concept.class_negative_prompt] * len(numbers),
            num_inference_steps=concept.class_infer_steps,
            guidance_scale=concept.class_guidance_scale,
            height=resolution,
            width=resolution,
            generator=generators,
        ).images
        for n, image in zip(numbers, images):
            made.append(write_atomic(folder / f"{n:05d}.png", lambda tmp, im=image: im.save(tmp, format="PNG")))
        progress(start + len(numbers), count)
    return made


def _is_empty_folder(folder: Path) -> bool:
    return folder.is_dir() and not any(folder.iterdir())
