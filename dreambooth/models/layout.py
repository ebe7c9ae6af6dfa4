"""Key names of the original (CompVis/LDM) single-file layout, from diffusers' names.

Works for any UNet/VAE of the SD 1.x block structure, whatever its depth or width, so tiny test models
and full-size checkpoints go through the same mapping. The reverse direction is diffusers' own
single-file loader, which the tests use as the oracle for this one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
POSITION_IDS = TEXT_ENCODER_PREFIX + "text_model.embeddings.position_ids"

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict under the LDM names (with ``model.diffusion_model.``)."""
    per_level = config["layers_per_block"] + 1
    up_has_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    out = {}
    for key, value in state_dict.items():
        out[UNET_PREFIX + _unet_key(key, per_level, up_has_attention)] = value
    return out


def _unet_key(key: str, per_level: int, up_has_attention: list[bool]) -> str:
    module, _, param = key.rpartition(".")
    for name, ldm in _UNET_TOP.items():
        if module == name:
            return f"{ldm}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = per_level * level + j + 1
        return f"input_blocks.{block}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{block}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{per_level * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = per_level * level + j
        return f"output_blocks.{block}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{block}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        level = int(m[1])
        slot = 2 if up_has_attention[level] else 1
        return f"output_blocks.{per_level * level + per_level - 1}.{slot}.conv.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    raise KeyError(f"UNet weight {key!r} has no place in the SD 1.x layout")


def _resnet(rest: str) -> str:
    module, _, param = rest.rpartition(".")
    return f"{_UNET_RESNET[module]}.{param}"


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict under the LDM names (with ``first_stage_model.``)."""
    levels = len(config["block_out_channels"])
    out = {}
    for key, value in state_dict.items():
        new_key = _vae_key(key, levels)
        if ".mid.attn_1." in new_key and new_key.endswith(".weight") and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)
        out[VAE_PREFIX + new_key] = value
    return out


def _vae_key(key: str, levels: int) -> str:
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_vae_resnet(m[3])}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet(m[3])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_vae_resnet(m[3])}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    return key


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


def text_encoder_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModel`` state dict under SD 1.x's ``cond_stage_model.transformer.text_model.``.

    transformers 5 flattened ``CLIPTextModel`` (no ``text_model.`` level, no ``position_ids`` buffer); the
    original layout has both, so both are restored here.
    """
    out = {}
    for key, value in state_dict.items():
        out[TEXT_ENCODER_PREFIX + (key if key.startswith("text_model.") else "text_model." + key)] = value
    positions = out[TEXT_ENCODER_PREFIX + "text_model.embeddings.position_embedding.weight"].shape[0]
    out.setdefault(POSITION_IDS, torch.arange(positions, dtype=torch.int64).unsqueeze(0))
    return out
