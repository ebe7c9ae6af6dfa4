"""Stable Diffusion 1.x: one OpenAI CLIP ViT-L text encoder, 512 px, the CompVis single-file layout."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..components import Components
from ..conditioning import Conditioning
from ..layout import text_encoder_to_ldm, unet_to_ldm, vae_to_ldm
from .base import ModelFamily, Shapes

TEXT_ENCODER_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"


class SD1(ModelFamily):
    """SD 1.x (1.4, 1.5 and what is trained from them; v-prediction variants too)."""

    name = "sd1"
    label = "SD 1.x"
    stock_predictions = {"epsilon": "sd1"}

    def recognises(self, shapes: Shapes) -> bool:
        return TEXT_ENCODER_KEY in shapes or "cond_stage_model.transformer.embeddings.token_embedding.weight" in shapes

    def recognises_folder(self, index: Mapping[str, Any], text_config: Mapping[str, Any]) -> bool:
        return index.get("_class_name", "StableDiffusionPipeline") == "StableDiffusionPipeline" and (
            text_config.get("hidden_act") == "quick_gelu"
        )

    def native_resolution(self, prediction_type: str) -> int:
        return 512

    def encode_prompts(self, components: Components, input_ids: Sequence[torch.Tensor]) -> Conditioning:
        return Conditioning(components.text_encoder(input_ids[0])[0])

    def export_tensors(self, components: Components) -> dict[str, torch.Tensor]:
        return {
            **unet_to_ldm(components.unet.state_dict(), components.unet.config),
            **vae_to_ldm(components.vae.state_dict(), components.vae.config),
            **text_encoder_to_ldm(components.text_encoder.state_dict()),
        }

    def architecture(self, prediction_type: str) -> str:
        return "stable-diffusion-v1" + ("/v-prediction" if prediction_type == "v_prediction" else "")

    def host_yaml_problems(self, configs: Mapping[str, dict] | None, prediction_type: str) -> list[str] | None:
        """The web UI guesses SD 1.x's stock epsilon model from its keys; anything else needs a yaml, which the
        web UI's LDM classes can describe unless :func:`~dreambooth.models.host_yaml.web_ui_cannot_build` says."""
        if configs is None:
            return None
        from ..host_yaml import web_ui_cannot_build

        return web_ui_cannot_build(configs)

    def pipeline_extras(self) -> dict[str, Any]:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


FAMILY = SD1()
