"""A full-size SD 1.x checkpoint (the shape users bring) loads through the shipped config folder, offline.

The weights are a cheap deterministic pattern, not random: what is checked is that every tensor of an
SD 1.5-shaped single file lands, exact, in the right place of the diffusers models.
"""

from __future__ import annotations

import json

import pytest
import torch

from dreambooth.models.export import checkpoint_tensors, save_checkpoint
from dreambooth.models.load import CONFIGS_DIR, load_model
from dreambooth.models.read import read_tensors

pytestmark = pytest.mark.slow  # an SD 1.5-sized model built, saved and loaded on the CPU

SD15_KEYS = {"model.diffusion_model.": 686, "first_stage_model.": 248, "cond_stage_model.": 197}


def _sd1_components(tokenizer):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreambooth.models.components import Components

    folder = CONFIGS_DIR / "sd1"
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(json.loads((folder / "unet" / "config.json").read_text()))
        vae = AutoencoderKL.from_config(json.loads((folder / "vae" / "config.json").read_text()))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_json_file(str(folder / "text_encoder" / "config.json")))
    for model in (unet, vae, text_encoder):
        model.to_empty(device="cpu")
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                p.copy_(torch.linspace(-1, 1, p.numel()).reshape(p.shape) * (1 + i % 7))
            for name, b in model.named_buffers():
                if name.endswith("position_ids"):
                    b.copy_(torch.arange(b.shape[-1]).expand_as(b))
    return Components(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler"),
    )


def test_an_sd15_shaped_file_loads_exactly_with_the_shipped_configs(tmp_path, tokenizer_dir):
    from dreambooth.models.tokenizer import load_clip_tokenizer

    components = _sd1_components(load_clip_tokenizer(tokenizer_dir))
    assert sum(p.numel() for p in components.unet.parameters()) == 859_520_964  # SD 1.5's UNet
    path = save_checkpoint(tmp_path / "sd15.safetensors", checkpoint_tensors(components, None, torch.float16))
    del components
    source = read_tensors(path)
    for prefix, count in SD15_KEYS.items():
        assert sum(k.startswith(prefix) for k in source) == count, prefix
    loaded = load_model(path, cache_dir=tmp_path / "cache", tokenizer_dir=str(tokenizer_dir))
    assert loaded.family.name == "sd1"
    assert next(loaded.components.unet.parameters()).dtype == torch.float32
    again = checkpoint_tensors(loaded.components, loaded.extra_tensors, torch.float16)
    assert again.keys() == source.keys()
    for key in source:
        assert torch.equal(again[key], source[key]), key
