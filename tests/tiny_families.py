"""Tiny SD 2.x and SDXL models built from a seed, written as single files in their released layouts.

Same block types and key layouts as the released models (SD 2.x: OpenCLIP text encoder with one unused last layer
and a text projection, linear-projection transformers; SDXL: two CLIP text encoders, the second with a projection,
``text_time`` added conditioning, several transformer layers per block), so every path runs in seconds on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tiny_model import SD_SCHEDULER, TINY_VAE

from dreambooth.models.components import Components
from dreambooth.models.export import checkpoint_tensors, save_checkpoint
from dreambooth.models.families import family_named
from dreambooth.models.tokenizer import load_clip_tokenizer

VAE = TINY_VAE
SCHEDULE = {k: v for k, v in SD_SCHEDULER.items() if k != "prediction_type"}
OPEN_CLIP_TEXT = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                  "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 16}
SD2_UNET = {
    "sample_size": 8,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": [2, 4],
    "use_linear_projection": True,
    "norm_num_groups": 8,
}
SDXL_UNET = {
    "sample_size": 8,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "transformer_layers_per_block": [1, 2],
    "cross_attention_dim": 32 + 48,
    "attention_head_dim": [2, 4],
    "use_linear_projection": True,
    "norm_num_groups": 8,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 16 + 6 * 8,
}
BIG_TEXT = {**OPEN_CLIP_TEXT, "hidden_size": 48, "intermediate_size": 96}
"""SDXL's second encoder is wider than its first (1280 against 768), which is how diffusers tells them apart."""
CLIP_TEXT = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 32}


def build_tiny_sd2(tokenizer_dir: Path, seed: int = 0, prediction_type: str = "epsilon",
                   unused_layers: int = 1) -> Components:
    """Random tiny SD 2.x components. The text encoder has two layers in use; the single file gets
    ``unused_layers`` more (as SD 2.x's file has OpenCLIP's 24th, which the penultimate-layer model never runs)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD2_UNET)
    vae = AutoencoderKL(**VAE)
    text = CLIPTextModel(CLIPTextConfig(**OPEN_CLIP_TEXT, num_hidden_layers=2 + unused_layers))
    return Components(unet=unet, vae=vae, text_encoder=text, tokenizer=load_clip_tokenizer(tokenizer_dir, "!"),
                      scheduler=DDPMScheduler(**SCHEDULE, prediction_type=prediction_type))


def build_tiny_sdxl(tokenizer_dir: Path, seed: int = 0) -> Components:
    """Random tiny SDXL components (two text encoders, the second with a projection)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return Components(
        unet=UNet2DConditionModel(**SDXL_UNET),
        vae=AutoencoderKL(**{**VAE, "force_upcast": True}),
        text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_TEXT)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**BIG_TEXT, num_hidden_layers=2)),
        tokenizer=load_clip_tokenizer(tokenizer_dir),
        tokenizer_2=load_clip_tokenizer(tokenizer_dir, "!"),
        scheduler=DDPMScheduler(**SCHEDULE),
    )


def write_family_config_folder(components: Components, folder: Path, family: str, text_layers: int = 2) -> Path:
    """The diffusers config folder (JSON only) that loads single files of this tiny shape offline; the SD 2.x
    text encoder is described with ``text_layers`` layers (the file's others are unused)."""
    pipeline = "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"
    index: dict[str, Any] = {
        "_class_name": pipeline,
        "scheduler": ["diffusers", "EulerDiscreteScheduler" if family == "sdxl" else "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if family == "sdxl":
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"], force_zeros_for_empty_prompt=True)
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    for name in ("unet", "vae"):
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(dict(getattr(components, name).config), default=list))
    scheduler = {**dict(components.scheduler.config), "_class_name": index["scheduler"][1], "skip_prk_steps": True}
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, default=list))
    for name, model in components.text_encoders.items():
        (folder / name).mkdir(exist_ok=True)
        config = model.config.to_dict()
        if family == "sd2":
            config["num_hidden_layers"] = text_layers
        (folder / name / "config.json").write_text(json.dumps(config, default=list))
    return folder


def write_tiny_single_file(components: Components, family: str, path: Path,
                           metadata: dict[str, str] | None = None) -> Path:
    """The components as one file of the family's released layout, plus the LDM noise-schedule buffers."""
    tensors = checkpoint_tensors(components, family=family_named(family))
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    tensors["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    return save_checkpoint(path, tensors, metadata)
