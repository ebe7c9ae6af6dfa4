"""Stable Diffusion 2.x: one OpenCLIP ViT-H text encoder (its penultimate layer), 512 px epsilon or 768 px
v-prediction, ``cond_stage_model.model.*`` in the single file."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..components import Components
from ..conditioning import Conditioning
from ..layout import text_encoder_to_open_clip, unet_to_ldm, vae_to_ldm
from .base import ModelFamily, Shapes

PREFIX = "cond_stage_model.model."
V_TEST_THRESHOLD = -1.0
"""The web UI's rule (``sd_models_config.is_using_v_parameterization_for_sd2``): a UNet whose output minus its
input, at timestep 999 on constant inputs, averages below this predicts v."""

V_PREDICTION_YAML = """\
# SD 2.x 768-v (v-prediction), as the web UI's own v2-inference-v.yaml; written by the DreamBooth extension so that
# Forge, which reads only 'parameterization' from it, samples this checkpoint as v-prediction too.
model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 96
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: True
        use_fp16: True
        image_size: 32
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_head_channels: 64
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: 1
        context_dim: 1024
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [ 1, 2, 4, 4 ]
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params:
        freeze: True
        layer: "penultimate"
"""


class SD2(ModelFamily):
    """SD 2.0 / 2.1, base (512, epsilon) and 768-v."""

    name = "sd2"
    lora_base_version = "sd_v2"
    label = "SD 2.x"
    pad_tokens = {"tokenizer": "!"}
    stock_predictions = {"epsilon": "sd2", "v_prediction": "sd2-v"}

    def recognises(self, shapes: Shapes) -> bool:
        return PREFIX + "token_embedding.weight" in shapes

    def recognises_folder(self, index: Mapping[str, Any], text_config: Mapping[str, Any]) -> bool:
        return index.get("_class_name", "StableDiffusionPipeline") == "StableDiffusionPipeline" and (
            text_config.get("hidden_act") == "gelu"
        )

    @torch.no_grad()
    def detect_prediction(self, components: Components) -> str:
        """The web UI's test, on diffusers' UNet: constant latents and context at timestep 999."""
        unet = components.unet
        width = unet.config.cross_attention_dim
        sample = torch.full((1, unet.config.in_channels, 8, 8), 0.5)
        context = torch.full((1, 2, width), 0.5)
        out = unet(sample, torch.tensor([999]), encoder_hidden_states=context).sample
        return "v_prediction" if (out - sample).mean().item() < V_TEST_THRESHOLD else "epsilon"

    def native_resolution(self, prediction_type: str) -> int:
        return 768 if prediction_type == "v_prediction" else 512

    def encode_prompts(self, components: Components, input_ids: Sequence[torch.Tensor]) -> Conditioning:
        # diffusers' SD 2.x text encoder stops at the penultimate layer and ends with the final layer norm,
        # which is what SD 2.x's FrozenOpenCLIPEmbedder(layer="penultimate") returns
        return Conditioning(components.text_encoder(input_ids[0])[0])

    def export_tensors(self, components: Components) -> dict[str, torch.Tensor]:
        return {
            **unet_to_ldm(components.unet.state_dict(), components.unet.config),
            **vae_to_ldm(components.vae.state_dict(), components.vae.config),
            **text_encoder_to_open_clip(components.text_encoder.state_dict(), PREFIX),
        }

    def placeholder_tensors(self, components: Components) -> dict[str, torch.Tensor]:
        """OpenCLIP's text projection and logit scale, which SD 2.x never uses (its released files have them, as
        ViT-H's square projection). diffusers' single-file loader reads the projection's first dimension as the width
        at which it splits the attention's joint q/k/v matrix, so it must be there."""
        width = components.text_encoder.config.hidden_size
        return {PREFIX + "text_projection": torch.zeros(width, width), PREFIX + "logit_scale": torch.tensor(4.6052)}

    def architecture(self, prediction_type: str) -> str:
        return "stable-diffusion-v2-768-v" if prediction_type == "v_prediction" else "stable-diffusion-v2-512"

    def host_yaml_problems(self, configs: Mapping[str, dict] | None, prediction_type: str) -> list[str] | None:
        """The web UI recognises SD 2.x by its keys and tells v from epsilon with the same test as
        :meth:`detect_prediction`; only the released shape has a config there."""
        if configs is None:
            return None
        return ["the web UI builds SD 2.x only in the released shape (its v2 yamls name OpenCLIP ViT-H-14)"]

    def stock_host_yaml(self, prediction_type: str) -> str | None:
        """For 768-v, the LDM config the web UI itself picks for it (its ``v2-inference-v.yaml``): Forge tells v from
        epsilon for SD 2.x only by the ``parameterization`` of a yaml beside the file (its guess from the weights
        never fires on a single file's prefixed keys), and the web UI builds from this one as from its own."""
        return V_PREDICTION_YAML if prediction_type == "v_prediction" else None

    def pipeline_extras(self) -> dict[str, Any]:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


FAMILY = SD2()
