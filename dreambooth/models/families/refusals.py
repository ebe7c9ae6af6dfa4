"""What a picked source may be that no family trains: each recognised from a single file's tensor names and
shapes, or a diffusers folder's ``model_index.json``, and refused naming what it is and what to pick instead."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...errors import ModelFormatError
from .base import Shapes

UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
PICK_FULL = "Pick a full SD 1.x, SD 2.x or SDXL checkpoint (the files the web UI's checkpoint dropdown lists)."


def refuse_single_file(shapes: Shapes, path: Path) -> None:
    """Raise :class:`ModelFormatError` when the file is something no family trains; return otherwise."""
    keys = list(shapes)
    what = _what_it_is(shapes, keys)
    if what is not None:
        kind, advice = what
        raise ModelFormatError(f"{path} is {kind}, not a model this extension trains.", advice)


def _what_it_is(shapes: Shapes, keys: list[str]) -> tuple[str, str] | None:
    lora_prefixes = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_transformer_")
    lora_parts = (".lora_down.", ".lora_A.", ".lora.down.", "lokr_", ".hada_")
    if any(k.startswith(lora_prefixes) or any(part in k for part in lora_parts) for k in keys):
        return ("a LoRA (a small add-on for a checkpoint)",
                "Pick the checkpoint it was made for; the web UI applies LoRAs from its Lora tab.")
    if any("joint_blocks." in k for k in keys):
        return "a Stable Diffusion 3 model", PICK_FULL
    if any("double_blocks." in k or "single_blocks." in k for k in keys):
        return "a Flux model", PICK_FULL
    if any(".time_stack." in k or ".time_mixer." in k for k in keys):
        return "a Stable Video Diffusion model", PICK_FULL
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys) and not any(
        k.startswith("conditioner.embedders.1.") for k in keys
    ):
        return ("an SDXL refiner (it only polishes the base model's images)",
                "Pick an SDXL base checkpoint (sd_xl_base_1.0 or a model built on it).")
    if UNET_IN in shapes and len(shapes[UNET_IN]) == 4 and shapes[UNET_IN][1] != 4:
        channels = shapes[UNET_IN][1]
        kind = "an inpainting model" if channels == 9 else "an instruct-pix2pix or depth model"
        return (f"{kind} (its UNet takes {channels} input channels, not 4)",
                "Pick the plain (text-to-image) version of this checkpoint.")
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        if any(k.startswith(("down_blocks.", "conv_in.")) for k in keys):
            return ("a diffusers UNet alone",
                    "Pick the diffusers folder that holds it (with model_index.json), or a single file.")
        if any("text_model.encoder.layers." in k or "transformer.resblocks." in k for k in keys):
            return "a text encoder alone", PICK_FULL
        if any(k.startswith(("encoder.down.", "decoder.up.", "first_stage_model.")) for k in keys):
            return "a VAE alone", PICK_FULL
        return "not a Stable Diffusion checkpoint (no UNet weights in it)", PICK_FULL
    return None


FOLDER_PIPELINES = {
    "StableDiffusion3Pipeline": "a Stable Diffusion 3 model",
    "FluxPipeline": "a Flux model",
    "StableVideoDiffusionPipeline": "a Stable Video Diffusion model",
    "StableDiffusionXLImg2ImgPipeline": "an SDXL refiner",
    "StableDiffusionInpaintPipeline": "an inpainting model",
    "StableDiffusionXLInpaintPipeline": "an inpainting model",
}


def refuse_folder(folder: Path, index: Mapping[str, Any], unet_config: Mapping[str, Any]) -> None:
    """Raise :class:`ModelFormatError` for a diffusers folder of a kind no family trains."""
    kind = FOLDER_PIPELINES.get(str(index.get("_class_name", "")))
    if kind is None and unet_config.get("in_channels", 4) != 4:
        kind = f"an inpainting or image-conditioned model (its UNet takes {unet_config['in_channels']} channels)"
    if kind is None and (folder / "text_encoder_2").is_dir() and not (folder / "text_encoder").is_dir():
        kind = "an SDXL refiner"
    if kind is not None:
        raise ModelFormatError(f"{folder} is {kind}, not a model this extension trains.", PICK_FULL)
