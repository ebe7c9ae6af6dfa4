"""How the web UI 1.10's built-in Lora finds the UNet layer of a LoRA key stem, restated from its
``extensions-builtin/Lora/networks.py`` (``convert_diffusers_name_to_compvis``, then ``load_network``'s fallback that
replaces ``lora_unet`` with ``diffusion_model``), so that the CPU tests can check our names against it without a
web UI. ``tests/a1111_lora_in_host.py`` checks the same against the real code when ``SD_WEBUI_DIR`` is set."""

from __future__ import annotations

import re

_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
           "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def _diffusers_to_compvis(stem: str) -> str:
    def suffix(kind: str, rest: str) -> str:
        return _RESNET.get(rest, rest) if kind == "resnets" else rest

    if m := re.match(r"lora_unet_conv_in(.*)", stem):
        return f"diffusion_model_input_blocks_0_0{m[1]}"
    if m := re.match(r"lora_unet_conv_out(.*)", stem):
        return f"diffusion_model_out_2{m[1]}"
    if m := re.match(r"lora_unet_time_embedding_linear_(\d+)(.*)", stem):
        return f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", stem):
        block = 1 + int(m[1]) * 3 + int(m[3])
        return f"diffusion_model_input_blocks_{block}_{1 if m[2] == 'attentions' else 0}_{suffix(m[2], m[4])}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", stem):
        block = 1 if m[1] == "attentions" else int(m[2]) * 2
        return f"diffusion_model_middle_block_{block}_{suffix(m[1], m[3])}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", stem):
        block = int(m[1]) * 3 + int(m[3])
        return f"diffusion_model_output_blocks_{block}_{1 if m[2] == 'attentions' else 0}_{suffix(m[2], m[4])}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", stem):
        return f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", stem):
        return f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"
    return stem


def webui_unet_layer(stem: str, layers: set[str]) -> str | None:
    """The web UI's layer name (``diffusion_model_input_blocks_1_1_proj_in``) that ``stem`` patches, or None.

    ``layers``: the names the web UI gives the UNet's modules (``diffusion_model.`` path, ``_`` for ``.``)."""
    name = _diffusers_to_compvis(stem)
    if name in layers:
        return name
    fallback = stem.replace("lora_unet", "diffusion_model")
    return fallback if fallback in layers else None
