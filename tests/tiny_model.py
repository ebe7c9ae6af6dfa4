"""A Stable Diffusion 1.x pipeline scaled down to a few hundred thousand weights, built from a seed.

Same block types, key layout and tokenizer as SD 1.x, so every code path (load, train, export, the host's
loader) runs on it in seconds on a CPU. Its weights are random: it learns, but it draws noise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dreambooth.models.components import Components

TINY_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}
TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [8, 16, 16, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}
TINY_TEXT_ENCODER = {
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
}
SD_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def build_tiny_components(tokenizer: Any, seed: int = 0, prediction_type: str = "epsilon") -> Components:
    """Random tiny SD 1.x components; the same seed gives the same weights on every machine."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_ENCODER))
    scheduler = DDPMScheduler(**{**SD_SCHEDULER, "prediction_type": prediction_type})
    return Components(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def write_config_folder(components: Components, folder: Path) -> Path:
    """Write the diffusers config folder (JSON only) that lets single files of this shape load offline."""
    folder.mkdir(parents=True, exist_ok=True)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.31.0",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    for name in ("unet", "vae", "scheduler"):
        (folder / name).mkdir(exist_ok=True)
        filename = "scheduler_config.json" if name == "scheduler" else "config.json"
        config = dict(getattr(components, name).config)
        if name == "scheduler":
            config["_class_name"] = "PNDMScheduler"
            config["skip_prk_steps"] = True
        (folder / name / filename).write_text(json.dumps(config, indent=2, default=_jsonable))
    (folder / "text_encoder").mkdir(exist_ok=True)
    components.text_encoder.config.to_json_file(str(folder / "text_encoder" / "config.json"))
    return folder


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON: {value!r}")
