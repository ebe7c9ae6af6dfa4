"""The parts of a Stable Diffusion model that training touches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Components:
    """UNet, VAE, text encoder(s), tokenizer(s) and noise scheduler, as diffusers/transformers objects.

    SDXL has a second text encoder and tokenizer (``text_encoder_2``, ``tokenizer_2``); other families leave them
    None, as diffusers' pipelines do.
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    text_encoder_2: Any = None
    tokenizer_2: Any = None

    @property
    def prediction_type(self) -> str:
        """'epsilon' or 'v_prediction', from the scheduler's config."""
        return self.scheduler.config.prediction_type

    @property
    def text_encoders(self) -> dict[str, Any]:
        """The text encoders present, by attribute name ('text_encoder', 'text_encoder_2')."""
        names = ("text_encoder", "text_encoder_2")
        return {name: model for name in names if (model := getattr(self, name)) is not None}

    @property
    def models(self) -> dict[str, Any]:
        """Every module with weights, by attribute name: the UNet, the VAE and the text encoders."""
        return {"unet": self.unet, "vae": self.vae, **self.text_encoders}
