"""The model families this extension trains, one module each, and how a source is matched to one.

To add a family: write its module (a :class:`~.base.ModelFamily` subclass and ``FAMILY``), ship its config
folder under ``models/configs/``, and list it in ``FAMILIES``. Nothing outside this package names a family.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...errors import ModelFormatError
from . import sd1, sd2, sdxl
from .base import ModelFamily, Shapes
from .refusals import PICK_FULL, refuse_folder, refuse_single_file

FAMILIES: tuple[ModelFamily, ...] = (sdxl.FAMILY, sd2.FAMILY, sd1.FAMILY)
"""Every family, most specific first (an SDXL file also has UNet and VAE keys of the SD shape)."""


def family_named(name: str) -> ModelFamily:
    """The family with this :attr:`~.base.ModelFamily.name`."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ModelFormatError(f"Unknown model family {name!r}.", "Load the source checkpoint again.")


def identify_single_file(shapes: Shapes, path: Path) -> ModelFamily:
    """The family of a single file from its tensor names and shapes; a clear error for everything else."""
    refuse_single_file(shapes, path)
    for family in FAMILIES:
        if family.recognises(shapes):
            return _complete(family, shapes, path)
    raise ModelFormatError(f"{path} has a UNet but no text encoder of a known family (SD 1.x, SD 2.x, SDXL).",
                           "Pick a complete checkpoint (UNet, VAE and text encoder in one file).")


def _complete(family: ModelFamily, shapes: Shapes, path: Path) -> ModelFamily:
    if not any(k.startswith("first_stage_model.") for k in shapes):
        raise ModelFormatError(f"{path} is {family.label} but has no VAE weights.",
                               "Pick a complete checkpoint (UNet, VAE and text encoder in one file).")
    return family


def identify_folder(folder: Path, index: Mapping[str, Any], text_config: Mapping[str, Any],
                    unet_config: Mapping[str, Any]) -> ModelFamily:
    """The family of a diffusers folder from its ``model_index.json`` and configs."""
    refuse_folder(folder, index, unet_config)
    for family in FAMILIES:
        if family.recognises_folder(index, text_config):
            return family
    raise ModelFormatError(f"{folder} is a {index.get('_class_name', 'diffusers')} model of no known family.",
                           PICK_FULL)


def family_of(components: Any) -> ModelFamily:
    """The family of components already built (the configs of their text encoders tell)."""
    index = {"_class_name": "StableDiffusionXLPipeline" if components.text_encoder_2 is not None
             else "StableDiffusionPipeline"}
    text_config = components.text_encoder.config.to_dict()
    for family in FAMILIES:
        if family.recognises_folder(index, text_config):
            return family
    raise ModelFormatError("These components belong to no known model family.", PICK_FULL)


__all__ = ["family_of", "FAMILIES", "ModelFamily", "family_named", "identify_folder", "identify_single_file"]
