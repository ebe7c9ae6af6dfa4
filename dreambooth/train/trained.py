"""What a run trains: every weight of the UNet and of the trained text encoders (``method="full"``), or LoRA
adapters on them (``method="lora"``, built with ``peft``, the library diffusers itself uses).

The loop asks this one object which parameters train, which tensors a resume snapshot holds, and how a text
encoder stops training; it never tests the method itself.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Mapping

import torch

from ..config import TrainConfig
from ..errors import ConfigError
from ..models.adapters import (  # noqa: F401 -- trained.UNET_LAYERS etc. stay importable
    ADAPTER,
    TEXT_ENCODER_LAYERS,
    UNET_LAYERS,
    adapter_layers,
    lora_layers,
    targeted,
    width_of,
)
from ..models.components import Components
from .speed.float8 import float8_dtype, store_frozen_in_fp8


class FullWeights:
    """Every weight of the UNet and of the trained text encoders trains, and a snapshot holds them all."""

    kind = "full"

    def attach(self, components: Components, text_encoders: Collection[str]) -> None:
        """Make the UNet and the named text encoders trainable; the other text encoders stay frozen."""
        components.unet.requires_grad_(True).train()
        for name, module in components.text_encoders.items():
            module.requires_grad_(name in text_encoders).train(name in text_encoders)

    def snapshot_parts(self, components: Components, text_encoders: Collection[str]) -> dict[str, torch.nn.Module]:
        """What a resume snapshot saves and restores, by name: objects with ``state_dict``/``load_state_dict``."""
        return {"unet": components.unet, **{name: components.text_encoders[name] for name in text_encoders}}

    def freeze(self, module: torch.nn.Module) -> None:
        """Stop training a text encoder (``text_encoder_stop``)."""
        module.requires_grad_(False).eval()

    def check(self, components: Components, text_encoders: Collection[str]) -> None:
        """Raise ``ConfigError`` now, before class images and caches, for settings these models cannot train."""

    def place(self, components: Components, text_encoders: Collection[str], device: torch.device,
              unet_dtype: torch.dtype, resident: Collection[str]) -> None:
        """Bring what the steps run to ``device``: the UNet in ``unet_dtype`` (cast on the way, so it never sits on
        the device in its loaded precision), and the text encoders named in ``resident`` as they are."""
        components.unet.to(device, unet_dtype)
        for name in resident:
            components.text_encoders[name].to(device)


class LoraAdapters(FullWeights):
    """LoRA adapters of ``rank`` and ``alpha`` on the UNet's ``lora_layers`` and on every trained text encoder's
    attention and MLP; the models' own weights stay frozen, and a snapshot holds only the adapters. With
    ``base_precision`` 'fp8' the frozen weights of what goes to the device are stored in float8
    (``train/speed/float8.py``)."""

    kind = "lora"

    def __init__(self, rank: int, alpha: float, unet_layers: str, seed: int = 0, base_precision: str = "weights"):
        self.rank, self.alpha, self.unet_layers, self.seed = rank, alpha, unet_layers, seed
        self.base_precision = base_precision

    def attach(self, components: Components, text_encoders: Collection[str]) -> None:
        """Add the adapters (once) and make only them trainable."""
        from ..models.families import family_of

        components.unet.requires_grad_(False).train()
        self._inject(components.unet, UNET_LAYERS[self.unet_layers], "the UNet")
        unread = family_of(components).unread_text_layers(components)
        for name, module in components.text_encoders.items():
            module.requires_grad_(False).train(name in text_encoders)
            if name in text_encoders:
                self._inject(module, _read_text_layers(module, unread.get(name)), name.replace("_", " "))
        for module in (components.unet, *(components.text_encoders[n] for n in text_encoders)):
            for parameter_name, parameter in module.named_parameters():
                if "lora_" in parameter_name:
                    parameter.requires_grad_(True)

    def snapshot_parts(self, components: Components, text_encoders: Collection[str]) -> dict[str, AdapterWeights]:
        return {"unet": AdapterWeights(components.unet),
                **{name: AdapterWeights(components.text_encoders[name]) for name in text_encoders}}

    def check(self, components: Components, text_encoders: Collection[str]) -> None:
        if self.base_precision == "fp8":
            float8_dtype()
        self._check_rank(components.unet, UNET_LAYERS[self.unet_layers], "the UNet")
        for name in text_encoders:
            self._check_rank(components.text_encoders[name], TEXT_ENCODER_LAYERS, name.replace("_", " "))

    def place(self, components: Components, text_encoders: Collection[str], device: torch.device,
              unet_dtype: torch.dtype, resident: Collection[str]) -> None:
        """As :meth:`FullWeights.place`; with an fp8 base, the adapters are added first (in the loaded precision, on
        the CPU: peft gives a new adapter its base layer's dtype), then the frozen weights of the UNet and of the
        resident text encoders are stored in float8 (the rest in ``unet_dtype``, resp. the encoder's own dtype)
        before they move, so the device never holds them in 16 or 32 bits."""
        if self.base_precision != "fp8":
            return super().place(components, text_encoders, device, unet_dtype, resident)
        self.attach(components, text_encoders)
        store_frozen_in_fp8(components.unet, unet_dtype)
        components.unet.to(device)
        for name in resident:
            encoder = components.text_encoders[name]
            store_frozen_in_fp8(encoder, next(p for p in encoder.parameters() if p.is_floating_point()).dtype)
            encoder.to(device)
        return None

    def freeze(self, module: torch.nn.Module) -> None:
        for parameter_name, parameter in module.named_parameters():
            if "lora_" in parameter_name:
                parameter.requires_grad_(False)
        module.eval()

    def _inject(self, model: torch.nn.Module, layers: tuple[str, ...], what: str) -> None:
        if any(True for _ in lora_layers(model)):
            return
        from peft import LoraConfig, inject_adapter_in_model

        self._check_rank(model, layers, what)
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(layers),
                            init_lora_weights="gaussian")
        with torch.random.fork_rng(devices=[]):  # the down weights' draw: from the seed, whatever ran before
            torch.manual_seed(self.seed)
            inject_adapter_in_model(config, model, adapter_name=ADAPTER)

    def _check_rank(self, model: torch.nn.Module, layers: tuple[str, ...], what: str) -> None:
        narrowest = min(((width_of(m), n) for n, m in model.named_modules()
                         if targeted(n, layers) and hasattr(m, "weight")), default=None)
        if narrowest is None:
            raise ConfigError(f"{what} has none of the layers 'lora_layers' = {self.unet_layers!r} names.",
                              "Pick another 'lora_layers'.")
        if self.rank > narrowest[0]:
            raise ConfigError(
                f"'lora_rank' {self.rank} is more than the width of {what}'s layer {narrowest[1]} "
                f"({narrowest[0]}): an adapter cannot have a higher rank than the layer it adapts.",
                f"Set 'lora_rank' to {narrowest[0]} or less.",
            )


class AdapterWeights:
    """A model's adapters as a resume snapshot sees them: their tensors only, by peft's names."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The adapters' tensors."""
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model, adapter_name=ADAPTER)

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Put saved adapter tensors back (all of them, or fail)."""
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, dict(tensors), adapter_name=ADAPTER)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"the snapshot's adapters do not fit this model: {unexpected[:3]}")

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The adapters' parameters."""
        return (p for n, p in self.model.named_parameters() if "lora_" in n)


def trained_weights(config: TrainConfig) -> FullWeights:
    """The :class:`FullWeights` or :class:`LoraAdapters` a run of ``config`` trains."""
    if config.method == "lora":
        return LoraAdapters(config.lora_rank, config.lora_alpha, config.lora_layers, config.seed,
                            config.lora_base_precision)
    return FullWeights()


def _read_text_layers(model: torch.nn.Module, first_unread: int | None) -> tuple[str, ...]:
    """:data:`TEXT_ENCODER_LAYERS` of a text encoder, by full module name, short of the layers from
    ``first_unread`` on (None: all are read)."""
    if first_unread is None:
        return TEXT_ENCODER_LAYERS
    names = []
    for name, _ in model.named_modules():
        layer = re.search(r"encoder\.layers\.(\d+)\.", name)
        if targeted(name, TEXT_ENCODER_LAYERS) and not (layer and int(layer[1]) >= first_unread):
            names.append(name)
    return tuple(names)
