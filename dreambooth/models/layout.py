"""Key names of the original (CompVis/LDM and Stability's SGM) single-file layout, from diffusers' names.

Works for any UNet/VAE of the SD block structure (SD 1.x, SD 2.x, SDXL), whatever its depth or width, so tiny
test models and full-size checkpoints go through the same mapping; text encoders are written in the OpenAI CLIP
(transformers) or the OpenCLIP layout, under the prefix the family's file uses. The reverse direction is
diffusers' own single-file loader, which the tests use as the oracle for this one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
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


def unet_module_to_ldm(module: str, config: Mapping[str, Any]) -> str:
    """The LDM name (without ``model.diffusion_model.``) of a diffusers UNet module: ``down_blocks.1.attentions.0``
    → ``input_blocks.4.1``."""
    per_level = config["layers_per_block"] + 1
    up_has_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    return _unet_key(module + ".weight", per_level, up_has_attention).removesuffix(".weight")


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
    raise KeyError(f"UNet weight {key!r} has no place in the LDM layout")


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


def text_encoder_to_ldm(
    state_dict: Mapping[str, torch.Tensor], prefix: str = TEXT_ENCODER_PREFIX
) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModel`` state dict in the OpenAI CLIP layout under ``prefix`` + ``text_model.``
    (SD 1.x: ``cond_stage_model.transformer.``; SDXL's first encoder: ``conditioner.embedders.0.transformer.``).

    transformers 5 flattened ``CLIPTextModel`` (no ``text_model.`` level, no ``position_ids`` buffer); the
    original layout has both, so both are restored here.
    """
    out = {}
    for key, value in state_dict.items():
        out[prefix + (key if key.startswith("text_model.") else "text_model." + key)] = value
    positions = out[prefix + "text_model.embeddings.position_embedding.weight"].shape[0]
    out.setdefault(prefix + "text_model.embeddings.position_ids", torch.arange(positions, dtype=torch.int64)[None])
    return out


_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def text_encoder_to_open_clip(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModel``/``CLIPTextModelWithProjection`` state dict in OpenCLIP's layout under
    ``prefix`` (SD 2.x: ``cond_stage_model.model.``; SDXL's second encoder: ``conditioner.embedders.1.model.``).

    OpenCLIP keeps query, key and value as one ``in_proj`` matrix and the projection as a matrix applied from the
    right (``x @ text_projection``), so those are concatenated and transposed; ``position_ids`` has no place there.
    """
    flat = {key.removeprefix("text_model."): value for key, value in state_dict.items()}
    out: dict[str, torch.Tensor] = {}
    attention: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        if key in _OPEN_CLIP_TOP:
            out[prefix + _OPEN_CLIP_TOP[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T
        elif key == "embeddings.position_ids":
            continue
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            attention.setdefault((m[1], m[3]), {})[m[2]] = value
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            out[f"{prefix}transformer.resblocks.{m[1]}.{_OPEN_CLIP_LAYER[m[2]]}.{m[3]}"] = value
        else:
            raise KeyError(f"text encoder weight {key!r} has no place in the OpenCLIP layout")
    for (layer, kind), parts in attention.items():
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts[n] for n in "qkv"])
    return out
