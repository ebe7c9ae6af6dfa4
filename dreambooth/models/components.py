"""The parts of a Stable Diffusion 1.x model that training touches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Components:
    """UNet, VAE, text encoder, tokenizer and noise scheduler, as diffusers/transformers objects."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any

    @property
    def prediction_type(self) -> str:
        """'epsilon' or 'v_prediction', from the scheduler's config."""
        return self.scheduler.config.prediction_type
