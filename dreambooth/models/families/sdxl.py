"""SDXL (base architecture): OpenAI CLIP ViT-L and OpenCLIP ViT-bigG, penultimate hidden states concatenated, the
second's pooled embedding and six micro-conditioning numbers per image, 1024 px, Stability's SGM single-file layout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..components import Components
from ..conditioning import Conditioning, ImageGeometry
from ..layout import text_encoder_to_ldm, text_encoder_to_open_clip, unet_to_ldm, vae_to_ldm
from .base import ModelFamily, Shapes, pooled_and_penultimate

CLIP_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
V_PREDICTION_MARKER = "v_pred"
"""An empty tensor some SDXL v-prediction files carry (ComfyUI's and Forge's marker)."""


class SDXL(ModelFamily):
    """SDXL 1.0 base and what is built on it (Pony, Illustrious, NoobAI ...)."""

    name = "sdxl"
    label = "SDXL"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    text_encoder_classes = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}
    pad_tokens = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}
    pipeline_class = "StableDiffusionXLPipeline"
    stock_predictions = {"epsilon": "sdxl", "v_prediction": "sdxl-v"}
    single_file_prefixes = {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": CLIP_PREFIX,
        "text_encoder_2": OPEN_CLIP_PREFIX,
    }
    lora_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    lora_unet_names = "ldm"
    lora_base_version = "sdxl_base_v1-0"

    def recognises(self, shapes: Shapes) -> bool:
        return OPEN_CLIP_PREFIX + "ln_final.weight" in shapes and any(k.startswith(CLIP_PREFIX) for k in shapes)

    def recognises_folder(self, index: Mapping[str, Any], text_config: Mapping[str, Any]) -> bool:
        return index.get("_class_name") == "StableDiffusionXLPipeline"

    def declared_prediction(self, shapes: Shapes, metadata: Mapping[str, str]) -> str | None:
        if V_PREDICTION_MARKER in shapes:
            return "v_prediction"
        return super().declared_prediction(shapes, metadata)

    def native_resolution(self, prediction_type: str) -> int:
        return 1024

    def encode_prompts(self, components: Components, input_ids: Sequence[torch.Tensor]) -> Conditioning:
        first, _ = pooled_and_penultimate(components.text_encoder, input_ids[0])
        second, pooled = pooled_and_penultimate(components.text_encoder_2, input_ids[1])
        return Conditioning(torch.cat([first, second], dim=-1), pooled=pooled)

    def unread_text_layers(self, components: Components) -> dict[str, int]:
        """The first encoder's last layer: its penultimate one is read, and it has no pooled output."""
        return {"text_encoder": components.text_encoder.config.num_hidden_layers - 1}

    def time_ids(self, geometries: Sequence[ImageGeometry], device: torch.device) -> torch.Tensor:
        return torch.tensor([g.as_time_ids() for g in geometries], dtype=torch.float32, device=device)

    def export_tensors(self, components: Components) -> dict[str, torch.Tensor]:
        return {
            **unet_to_ldm(components.unet.state_dict(), components.unet.config),
            **vae_to_ldm(components.vae.state_dict(), components.vae.config),
            **text_encoder_to_ldm(components.text_encoder.state_dict(), CLIP_PREFIX),
            **text_encoder_to_open_clip(components.text_encoder_2.state_dict(), OPEN_CLIP_PREFIX),
        }

    def placeholder_tensors(self, components: Components) -> dict[str, torch.Tensor]:
        """OpenCLIP's logit scale (only contrastive training reads it), at the trained CLIP models' value ln 100; and
        for a v-prediction model the empty ``v_pred`` tensor by which the web UI 1.10, Forge and ComfyUI know one."""
        tensors = {OPEN_CLIP_PREFIX + "logit_scale": torch.tensor(math.log(100.0))}
        if components.scheduler is not None and components.prediction_type == "v_prediction":
            tensors[V_PREDICTION_MARKER] = torch.tensor([])
        return tensors

    def architecture(self, prediction_type: str) -> str:
        return "stable-diffusion-xl-v1-base" + ("/v-prediction" if prediction_type == "v_prediction" else "")

    def host_yaml_problems(self, configs: Mapping[str, dict] | None, prediction_type: str) -> list[str] | None:
        """The web UI recognises SDXL by its keys (``conditioner.embedders.1.model.ln_final.weight``)."""
        if configs is None:
            return None
        return ["the web UI builds SDXL only in the released shape (its sd_xl_base.yaml)"]

    def pipeline_extras(self) -> dict[str, Any]:
        return {"force_zeros_for_empty_prompt": True}


FAMILY = SDXL()
