"""The demo's settings, apart from the code that runs it (no torch here: the supervisor reads them too).

:class:`DemoSettings` are the knobs of one demo run (``python -m dreambooth demo``); :func:`training_values` are
the ones the engine takes, which a new model made from the shipped demo model starts from as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEMO_MODEL_TITLE = "DreamBooth demo: shapes (tiny SD 1.x)"
"""The ``modelspec.title`` in the shipped demo model's header."""


@dataclass
class DemoSettings:
    """The knobs of one demo run; :func:`settings` gives the default and the quick (CI) ones."""

    steps: int = 800
    learning_rate: float = 1e-4
    batch_size: int = 2
    num_class_images: int = 32
    class_steps: int = 15
    samples: int = 32  # per prompt and model
    sample_steps: int = 15
    guidance: float = 5.0
    train_text_encoder: bool = True
    text_encoder_lr: float = 1e-4
    prior_loss_weight: float = 0.1
    captions: bool = False  # instance captions that name the background: "a zwx shape on a white background"
    # the LoRA run (method="lora", with prior preservation): its own steps, rates and adapters
    lora_steps: int = 800
    lora_learning_rate: float = 1.4e-3
    lora_text_encoder_lr: float = 1.4e-3
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_layers: str = "attention_ff"
    device: str = "cpu"
    engine_options: dict[str, Any] = field(default_factory=dict)  # more TrainConfig values, e.g. the speed switches


def settings(quick: bool) -> DemoSettings:
    """Default settings (the README's numbers) or the reduced ones the CI test runs."""
    return DemoSettings(num_class_images=16, samples=16, sample_steps=10, class_steps=10) if quick \
        else DemoSettings()


def training_values(options: DemoSettings, method: str = "full") -> dict[str, Any]:
    """The :class:`~dreambooth.config.TrainConfig` values the demo trains with (steps, batch, learning rates,
    text-encoder training, prior loss weight, constant schedule); ``method="lora"``: the LoRA run's, with its
    steps, rates, rank, alpha and layers."""
    values = dict(max_steps=options.steps, batch_size=options.batch_size, learning_rate=options.learning_rate,
                  lr_scheduler="constant", train_text_encoder=options.train_text_encoder,
                  text_encoder_lr=options.text_encoder_lr, prior_loss_weight=options.prior_loss_weight)
    if method == "lora":
        values.update(method="lora", max_steps=options.lora_steps, learning_rate=options.lora_learning_rate,
                      text_encoder_lr=options.lora_text_encoder_lr, lora_rank=options.lora_rank,
                      lora_alpha=options.lora_alpha, lora_layers=options.lora_layers)
    return values
