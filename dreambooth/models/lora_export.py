"""Write a run's LoRA: ``<output_dir>/<name>_<step>.safetensors`` (the web UI's ``models/Lora/<name>/``), whole or
not at all, in kohya's layout (``models/lora_file.py``), with the header the web UI's Lora card shows."""

from __future__ import annotations

import datetime as _dt
from collections import Counter
from pathlib import Path

from .. import __version__
from ..config import TrainConfig
from ..events import Events
from ..fileio import write_atomic
from .adapters import adapter_layers
from .export import SAVE_DTYPES
from .load import LoadedModel
from .lora_file import layers_of, lora_metadata, lora_tensors

STARTED_AT = _dt.datetime.now().timestamp()
"""When this training process started (``ss_training_started_at``)."""


def save_lora(config: TrainConfig, loaded: LoadedModel, output_dir: Path, step: int, events: Events) -> Path:
    """Write the LoRA of ``step`` and report it as ``checkpoint_saved`` (kind 'lora')."""
    from safetensors.torch import save_file

    family, prediction = loaded.family, loaded.components.prediction_type
    path = output_dir / f"{config.model_name}_{step}.safetensors"
    layers = layers_of(family, loaded.components, adapter_layers(loaded.components))
    tensors = lora_tensors(layers, SAVE_DTYPES[config.save_dtype])
    training = {
        "extension": f"dreambooth {__version__}",
        "base_model": Path(config.source_checkpoint).name,
        "base_model_id": loaded.source_id,
        "step": step,
        "started_at": STARTED_AT,
        "instance_prompts": [c.instance_prompt for c in config.concepts],
        "learning_rate": config.learning_rate,
        "lora_layers": config.lora_layers,
        "train_text_encoder": config.train_text_encoder,
        "resolution": config.resolution,
        "seed": config.seed,
        **_kohya_training_keys(config, step),
    }
    metadata = lora_metadata(family, prediction, config.resolution, path.stem,
                             f"{config.model_name} (step {step})", layers, training)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    events.emit("checkpoint_saved", step=step, path=str(path), kind="lora")
    return path


def _kohya_training_keys(config: TrainConfig, step: int) -> dict[str, object]:
    """The ``ss_*`` keys of kohya's trainers that the web UI's Lora card and the Civitai-style tools read."""
    tags: dict[str, Counter] = {}
    for concept in config.concepts:
        words = [w.strip() for w in concept.instance_prompt.split(",") if w.strip()]
        tags[Path(concept.instance_dir).name or "instance"] = Counter(words)
    return {
        "ss_sd_model_name": Path(config.source_checkpoint).name,
        "ss_learning_rate": str(config.learning_rate),
        "ss_text_encoder_lr": str(config.text_encoder_lr if config.train_text_encoder else 0),
        "ss_unet_lr": str(config.learning_rate),
        "ss_max_train_steps": str(config.max_steps),
        "ss_steps": str(step),
        "ss_seed": str(config.seed),
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_optimizer": config.optimizer,
        "ss_mixed_precision": config.mixed_precision,
        "ss_prior_loss_weight": str(config.prior_loss_weight if config.prior_preservation else 0),
        "ss_tag_frequency": {name: dict(counts) for name, counts in tags.items()},
    }
