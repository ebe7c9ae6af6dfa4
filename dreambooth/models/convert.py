"""``python -m dreambooth convert``: a single file to a diffusers folder, and a diffusers folder to a single file."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..errors import ModelFormatError
from .export import SAVE_DTYPES, checkpoint_tensors, modelspec, save_checkpoint
from .load import _load_diffusers_folder, _load_single_file
from .pipeline import inference_pipeline

SINGLE_FILE_OUTPUTS = (".safetensors", ".ckpt")


def convert(
    source: Path, destination: Path, dtype: str = "fp16", tokenizer_dir: str = "", config_dir: str = ""
) -> Path:
    """Convert between the two layouts; the direction follows from what ``source`` and ``destination`` are."""
    if destination.exists() and destination.is_file():
        raise ModelFormatError(f"{destination} exists already.", "Pick a new name; nothing was overwritten.")
    with tempfile.TemporaryDirectory() as cache:
        if source.is_file():
            if destination.suffix.lower() in SINGLE_FILE_OUTPUTS:
                raise ModelFormatError("Both sides are single files.", "Give a folder as the destination.")
            loaded = _load_single_file(source, Path(cache), tokenizer_dir, config_dir)
            inference_pipeline(loaded.family, loaded.components).save_pretrained(str(destination))
            return destination
        if source.is_dir():
            if destination.suffix.lower() not in SINGLE_FILE_OUTPUTS:
                raise ModelFormatError(f"{destination} must end in .safetensors or .ckpt.")
            loaded = _load_diffusers_folder(source, Path(cache), tokenizer_dir)
            tensors = checkpoint_tensors(loaded.components, None, SAVE_DTYPES[dtype], loaded.family)
            meta = modelspec(
                loaded.family,
                loaded.components.prediction_type,
                8 * loaded.components.unet.config.sample_size,
                destination.stem,
            )
            return save_checkpoint(destination, tensors, meta)
    raise ModelFormatError(f"{source} does not exist.")
