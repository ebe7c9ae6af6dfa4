"""The optimizer and learning-rate schedule a config asks for."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..config import TrainConfig
from ..errors import ConfigError


def build_optimizer(config: TrainConfig, groups: list[dict], allow_8bit: bool = True) -> torch.optim.Optimizer:
    """AdamW (:func:`torch_adamw`), AdamW 8-bit (bitsandbytes) or Adafactor over parameter ``groups``
    (each ``{"params": [...], "lr": float}``); ``allow_8bit=False`` gives plain AdamW for ``adamw_8bit``."""
    name = "adamw" if config.optimizer == "adamw_8bit" and not allow_8bit else config.optimizer
    if name == "adamw":
        return torch_adamw(groups, adam_arguments(config))
    if name == "adamw_8bit":
        return require_bitsandbytes().optim.AdamW8bit(groups, **adam_arguments(config))
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            groups,
            lr=config.learning_rate,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
            weight_decay=config.weight_decay,
        )
    raise ConfigError(f"Unknown optimizer {config.optimizer!r}.")


def torch_adamw(groups: list[dict], arguments: dict) -> torch.optim.AdamW:
    """torch's AdamW as one fused kernel where this torch has one for the weights' device (CUDA; the CPU since
    torch 2.4), else its multi-tensor form. torch's own default on a CPU is a Python loop over the tensors: a third
    of the demo model's training step on 2 cores (31 ms of an update that the fused kernel does in 7.5 ms)."""
    try:  # each attempt gets its own copies: torch writes its flags into the groups before it checks the device
        return torch.optim.AdamW([dict(g) for g in groups], **arguments, fused=True)
    except (RuntimeError, ValueError):  # this torch has no fused kernel for these weights' device or dtype
        return torch.optim.AdamW([dict(g) for g in groups], **arguments, foreach=True)


def load_keeping_kernel(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, with the groups keeping this build's ``fused``/``foreach`` flags: a
    resume point saved by another version or device would otherwise bring its own (a CPU snapshot from before
    the fused kernel resumes on the slow loop; a non-fused one under an fp16 GradScaler fails)."""
    flags = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, flags):
        group.update(kept)


def adam_arguments(config: TrainConfig) -> dict:
    """Learning rate, betas, epsilon and weight decay of the AdamW variants, as keyword arguments."""
    return {
        "lr": config.learning_rate,
        "betas": (config.adam_beta1, config.adam_beta2),
        "eps": config.adam_epsilon,
        "weight_decay": config.weight_decay,
    }


def require_bitsandbytes():
    """The bitsandbytes module, or a ConfigError saying how to get it or what to pick instead."""
    bnb = bitsandbytes_or_none()
    if bnb is None:
        raise ConfigError(
            "'optimizer' is adamw_8bit, but bitsandbytes is not installed or finds no GPU.",
            "Set 'weights_dtype' to bf16 (this extension's own 8-bit AdamW, any device), install bitsandbytes "
            "(`pip install bitsandbytes`, NVIDIA GPU) or pick adamw / adafactor.",
        )
    return bnb


def bitsandbytes_or_none():
    """The bitsandbytes module when it imports and has a working GPU backend, else None."""
    try:
        import bitsandbytes as bnb
    except Exception:  # it raises RuntimeError/ImportError/OSError when its CUDA library is missing
        return None
    return bnb if torch.cuda.is_available() else None


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
