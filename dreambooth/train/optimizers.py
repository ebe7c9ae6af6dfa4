"""The optimizers a run can pick, declared once: what each is, which update paths run it, and how it is built there.

The paths (how gradients become new UNet weights, ``update.py``):

- ``torch``: a torch optimizer on fp32 weights; also the text encoders' path whenever they train;
- ``flat``: the UNet's weights as one flat buffer (``speed/flat.py``), bf16 with stochastic rounding, updated by our
  own kernel after the backward pass;
- ``backward``: that update run bucket by bucket inside the backward pass (``speed/backward.py``);
- ``step_graph``: the backward-pass update recorded with the whole step in one CUDA graph (``speed/step_graph.py``).

Everything that depends on the optimizer reads this table: ``config.py`` its choices and help,
``config.validate_for_training`` which settings the optimizer can run, the engine's ``weights_dtype: auto``, the
loop's choice of CUDA graph, ``update.py`` the builders, and the tab which choices this machine can run. Nothing is
substituted: a path an optimizer lacks is refused, or left for one it has where the setting is automatic.

This module imports nothing heavy at import time (``config.py`` imports it); builders import what they need.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ConfigError

if TYPE_CHECKING:
    from .speed.flat import FlatParameters


class OptimizerSettings(Protocol):
    """What the builders read of a run's settings (``config.TrainConfig`` has them; this module does not import
    it, since ``config.py`` reads this table)."""

    learning_rate: float
    adam_beta1: float
    adam_beta2: float
    adam_epsilon: float
    weight_decay: float
    max_grad_norm: float

PATHS = ("torch", "flat", "backward", "step_graph")

PATH_DESCRIPTIONS = {
    "torch": ("on fp32 weights with torch's optimizer step", "set 'weights_dtype' to bf16"),
    "flat": ("on bf16 weights (the flat buffer with stochastic rounding)", "set 'weights_dtype' to fp32"),
    "backward": ("inside the backward pass", "turn 'optimizer_in_backward' off"),
    "step_graph": ("inside the whole-step CUDA graph", "turn 'cuda_graphs' off"),
}
"""``path -> (where it runs, the setting that avoids it)``, for messages."""


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer: its name (the config's value), a line of help, the paths it runs on, the package a path needs
    (``path -> (package, how to get it)``), and its builders: ``build_torch(groups, config)`` a torch optimizer over
    parameter groups, ``build_flat(flat, config, compile)`` our kernel over a :class:`FlatParameters`."""

    name: str
    help: str
    paths: frozenset[str]
    build_torch: Callable[[list[dict], OptimizerSettings], Any]
    build_flat: Callable[[FlatParameters, OptimizerSettings, bool], Any]
    needs: dict[str, tuple[str, str]] = field(default_factory=dict)

    def runs_on(self, path: str) -> bool:
        """Whether this optimizer can run on ``path`` (one of :data:`PATHS`)."""
        return path in self.paths


def adam_arguments(config: OptimizerSettings) -> dict:
    """Learning rate, betas, epsilon and weight decay of the AdamW variants, as keyword arguments."""
    return {
        "lr": config.learning_rate,
        "betas": (config.adam_beta1, config.adam_beta2),
        "eps": config.adam_epsilon,
        "weight_decay": config.weight_decay,
    }


def torch_adamw(groups: list[dict], arguments: dict) -> Any:
    """torch's AdamW as one fused kernel where this torch has one for the weights' device (CUDA; the CPU since
    torch 2.4), else its multi-tensor form. torch's own default on a CPU is a Python loop over the tensors: a third
    of the demo model's training step on 2 cores (31 ms of an update that the fused kernel does in 7.5 ms)."""
    import torch

    try:  # each attempt gets its own copies: torch writes its flags into the groups before it checks the device
        return torch.optim.AdamW([dict(g) for g in groups], **arguments, fused=True)
    except (RuntimeError, ValueError):  # this torch has no fused kernel for these weights' device or dtype
        return torch.optim.AdamW([dict(g) for g in groups], **arguments, foreach=True)


def require_bitsandbytes():
    """The bitsandbytes module, or a ConfigError saying how to get it or what to pick instead."""
    bnb = bitsandbytes_or_none()
    if bnb is None:
        raise ConfigError(
            "'optimizer' is adamw_8bit, but bitsandbytes is not installed or finds no GPU.",
            "Install bitsandbytes (`pip install bitsandbytes`) or pick adamw / adafactor (on bf16 weights AdamW 8-bit "
            "needs no bitsandbytes for the UNet; a trained text encoder still does).",
        )
    return bnb


def bitsandbytes_or_none():
    """The bitsandbytes module when it imports and has a working GPU backend, else None."""
    import torch

    try:
        import bitsandbytes as bnb
    except Exception:  # it raises RuntimeError/ImportError/OSError when its CUDA library is missing
        return None
    return bnb if torch.cuda.is_available() else None


def _clip(config: OptimizerSettings) -> float | None:
    return config.max_grad_norm or None


def _torch_adamw(groups: list[dict], config: OptimizerSettings):
    return torch_adamw(groups, adam_arguments(config))


def _flat_adamw(flat: FlatParameters, config: OptimizerSettings, compile: bool):
    from .speed.adamw import FlatAdamW

    return FlatAdamW(flat, **adam_arguments(config), max_grad_norm=_clip(config), compile=compile)


def _torch_adamw_8bit(groups: list[dict], config: OptimizerSettings):
    return require_bitsandbytes().optim.AdamW8bit(groups, **adam_arguments(config))


def _flat_adamw_8bit(flat: FlatParameters, config: OptimizerSettings, compile: bool):
    from .speed.adamw8bit import FlatAdamW8bit

    return FlatAdamW8bit(flat, **adam_arguments(config), max_grad_norm=_clip(config), compile=compile)


def _torch_adafactor(groups: list[dict], config: OptimizerSettings):
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=config.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False,
                     weight_decay=config.weight_decay)


def _flat_adafactor(flat: FlatParameters, config: OptimizerSettings, compile: bool):
    from .speed.adafactor import FlatAdafactor

    return FlatAdafactor(flat, lr=config.learning_rate, weight_decay=config.weight_decay,
                         max_grad_norm=_clip(config), compile=compile)


ADAFACTOR_PATHS = frozenset(PATHS) - {"step_graph"}
"""Not in the whole-step CUDA graph: on the full-size SDXL UNet (H200, 2026-12-07, bench/peers.py) its compiled
update failed inside the capture ('operation not permitted when stream is capturing'), and the aborted capture left
the CUDA generator that stochastic rounding draws from unusable for the eager steps after it. The fused step runs
it eagerly, as kohya's fused backward pass does."""

OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec(
            "adamw",
            "AdamW: two fp32 moments, 8 bytes of state a weight (torch's fused kernel on fp32 weights, our own with "
            "bf16 weights or the fused step)",
            frozenset(PATHS),
            _torch_adamw,
            _flat_adamw,
        ),
        OptimizerSpec(
            "adamw_8bit",
            "AdamW 8-bit: the moments in 8 bits, 2 bytes a weight (with bf16 weights or the fused step our own "
            "kernel, any device; with fp32 weights bitsandbytes' AdamW8bit, CUDA)",
            frozenset(PATHS),
            _torch_adamw_8bit,
            _flat_adamw_8bit,
            needs={"torch": ("bitsandbytes", "pip install bitsandbytes (needs an NVIDIA GPU)")},
        ),
        OptimizerSpec(
            "adafactor",
            "Adafactor: transformers' arithmetic at the schedule's learning rate, no first moment, the second "
            "factored into row and column means (0.4 bytes of state a weight for SDXL): the least memory",
            ADAFACTOR_PATHS,
            _torch_adafactor,
            _flat_adafactor,
        ),
    )
}


def optimizer_choices() -> tuple[str, ...]:
    """The names a config may pick, in the table's order."""
    return tuple(OPTIMIZERS)


def optimizer_help() -> str:
    """The ``optimizer`` option's help: each optimizer's line."""
    return "; ".join(spec.help for spec in OPTIMIZERS.values()) + "."


def optimizer_spec(name: str) -> OptimizerSpec:
    """The table's entry for ``name``; a ConfigError naming the choices for an unknown one."""
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ConfigError(f"Unknown optimizer {name!r}.", f"Pick one of {', '.join(OPTIMIZERS)}.") from None


def check_paths(name: str, paths: Iterable[str]) -> None:
    """Refuse ``paths`` that optimizer ``name`` cannot run on, naming the optimizers that can and the setting that
    avoids the path."""
    spec = optimizer_spec(name)
    for path in paths:
        if not spec.runs_on(path):
            where, avoid = PATH_DESCRIPTIONS[path]
            others = [other.name for other in OPTIMIZERS.values() if other.runs_on(path)]
            advice = f"Pick {' or '.join(others)}, or {avoid}." if others else f"{avoid[0].upper()}{avoid[1:]}."
            raise ConfigError(f"'optimizer' {name} cannot run {where}.", advice)


def unavailable_reason(spec: OptimizerSpec, installed: Callable[[str], bool]) -> str | None:
    """None when some path of ``spec`` runs on this machine (``installed(package)`` says what is there); else why
    not: the packages its paths need."""
    blocked = {path: need for path, need in spec.needs.items() if not installed(need[0])}
    if spec.paths - set(blocked):
        return None
    return "; ".join(f"{package} is not installed ({remedy})" for package, remedy in dict(blocked.values()).items())
