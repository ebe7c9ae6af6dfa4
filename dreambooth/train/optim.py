"""The torch optimizer and the learning-rate schedule a config asks for (each optimizer's builders: optimizers.py)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..config import TrainConfig
from .optimizers import optimizer_spec


def build_optimizer(config: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """The configured optimizer on torch's path (``optimizers.py``: torch's AdamW, bitsandbytes' AdamW8bit or
    transformers' Adafactor) over parameter ``groups`` (each ``{"params": [...], "lr": float}``)."""
    return optimizer_spec(config.optimizer).build_torch(groups, config)


def load_keeping_kernel(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, with the groups keeping this build's ``fused``/``foreach`` flags: a
    resume point saved by another version or device would otherwise bring its own (a CPU snapshot from before
    the fused kernel resumes on the slow loop; a non-fused one under an fp16 GradScaler fails)."""
    flags = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, flags):
        group.update(kept)


def build_lr_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """diffusers' schedule of the configured shape over ``total_steps`` optimizer steps."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=total_steps,
        num_cycles=config.lr_cycles,
        power=config.lr_power,
    )


def trainable(parameters: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """The parameters that receive gradients."""
    return [p for p in parameters if p.requires_grad]
