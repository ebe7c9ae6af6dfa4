"""What every model family tells the rest of the program: the one interface behind which SD 1.x, SD 2.x and SDXL
(and later SD3, Flux) differ.

A family is one module in this package with one :class:`ModelFamily` subclass. The loader, the data pipeline,
the loop, the exporter, the tab and the API ask it; none of them tests a family's name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..components import Components
from ..conditioning import Conditioning, ImageGeometry

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
"""The shipped offline diffusers config folders, one per family and prediction type."""

Shapes = Mapping[str, tuple[int, ...]]
"""A single file's tensors as name → shape (read from the header, no weights loaded)."""

COMMON_CONFIG_FILES = (
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
)


class ModelFamily:
    """One model family. Subclasses set the class attributes and implement the methods that raise here."""

    name: str = ""
    """Short id: 'sd1', 'sd2', 'sdxl'."""
    label: str = ""
    """What the tab and the messages call it: 'SD 1.x'."""
    text_encoder_names: tuple[str, ...] = ("text_encoder",)
    """The ``Components`` attributes of its text encoders, in the order their hidden states are concatenated."""
    text_encoder_classes: Mapping[str, str] = {"text_encoder": "CLIPTextModel"}
    """The transformers class of each text encoder."""
    pad_tokens: Mapping[str, str] = {"tokenizer": "<|endoftext|>"}
    """The padding token of each tokenizer (OpenAI CLIP pads with end-of-text, OpenCLIP with '!', id 0)."""
    pipeline_class: str = "StableDiffusionPipeline"
    """diffusers' text-to-image pipeline for it: single-file loading, class images and previews."""
    stock_predictions: Mapping[str, str] = {"epsilon": ""}
    """Prediction type → the shipped config folder (under ``CONFIGS_DIR``) of the released model that uses it."""
    default_prediction: str = "epsilon"
    single_file_prefixes: Mapping[str, str] = {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "cond_stage_model.",
    }
    """Where each component's weights live in the single file (``Components`` attribute → key prefix)."""

    lora_prefixes: Mapping[str, str] = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    """The prefix of each part's keys in a LoRA file of kohya's layout, the one the web UI's Lora reads."""
    lora_unet_names: str = "diffusers"
    """How a LoRA file names the UNet's layers: 'diffusers' (module paths as diffusers has them, as kohya writes
    SD 1.x/2.x LoRAs) or 'ldm' (the single file's, as kohya writes SDXL's: the web UI misplaces some diffusers
    names of SDXL)."""
    lora_base_version: str = "sd_v1"
    """A LoRA's ``ss_base_model_version``: the web UI's Lora tab offers one whose value starts with 'sdxl_' only
    beside an SDXL model, any other only beside the others."""

    @property
    def config_files(self) -> tuple[str, ...]:
        """The files of its diffusers config folder that the single-file loader reads."""
        extra = tuple(f"{name}/config.json" for name in self.text_encoder_names if name != "text_encoder")
        return COMMON_CONFIG_FILES + extra

    @property
    def tokenizer_names(self) -> tuple[str, ...]:
        """The ``Components`` attributes of the tokenizers, one per text encoder, in the same order."""
        return tuple(name.replace("text_encoder", "tokenizer") for name in self.text_encoder_names)

    def stock_config_folder(self, prediction_type: str | None = None) -> Path:
        """The shipped config folder for ``prediction_type`` (the family's usual one when it has none of its own)."""
        folder = self.stock_predictions.get(prediction_type or "") or self.stock_predictions[self.default_prediction]
        return CONFIGS_DIR / folder

    def recognises(self, shapes: Shapes) -> bool:
        """Whether a single file with these tensors is a model of this family (refusals have run before)."""
        raise NotImplementedError

    def recognises_folder(self, index: Mapping[str, Any], text_config: Mapping[str, Any]) -> bool:
        """Whether a diffusers folder with this ``model_index.json`` and text-encoder config is of this family."""
        raise NotImplementedError

    def declared_prediction(self, shapes: Shapes, metadata: Mapping[str, str]) -> str | None:
        """The prediction type a single file declares (ModelSpec header; a family's own marker), or None."""
        declared = metadata.get("modelspec.prediction_type", "")
        if declared in ("v", "v_prediction"):
            return "v_prediction"
        if declared == "epsilon":
            return "epsilon"
        return None

    def detect_prediction(self, components: Components) -> str:
        """The prediction type of a file that declares none, from its weights where the family can tell."""
        return self.default_prediction

    def native_resolution(self, prediction_type: str) -> int:
        """The side in pixels its released models were trained at."""
        raise NotImplementedError

    def encode_prompts(self, components: Components, input_ids: Sequence[torch.Tensor]) -> Conditioning:
        """Text conditioning (no time ids) of tokenized prompts, one ``input_ids`` tensor per text encoder."""
        raise NotImplementedError

    def unread_text_layers(self, components: Components) -> dict[str, int]:
        """Per text encoder whose last layers :meth:`encode_prompts` never reads, the index of the first of them:
        adapters there would learn nothing."""
        return {}

    def time_ids(self, geometries: Sequence[ImageGeometry], device: torch.device) -> torch.Tensor | None:
        """The per-image micro-conditioning its UNet reads, or None."""
        return None

    def export_tensors(self, components: Components) -> dict[str, torch.Tensor]:
        """Every weight of the model under the names of its original single file."""
        raise NotImplementedError

    def placeholder_tensors(self, components: Components) -> dict[str, torch.Tensor]:
        """Tensors its released files have that no loader reads and the components do not hold, written only where
        the source did not carry them (so that other tools see the layout they expect)."""
        return {}

    def architecture(self, prediction_type: str) -> str:
        """Its ModelSpec ``modelspec.architecture``."""
        raise NotImplementedError

    def host_yaml_problems(self, configs: Mapping[str, dict] | None, prediction_type: str) -> list[str] | None:
        """None when the web UI builds the model from its weights alone; else what keeps the web UI from building
        it from a ``.yaml`` beside it (an empty list: a yaml describes it, write one)."""
        return None

    def stock_host_yaml(self, prediction_type: str) -> str | None:
        """The ``.yaml`` both web UIs need beside a file of the released shape, or None when they need none: the
        web UI 1.10 builds from it as from its own config, and Forge reads only its prediction type from it."""
        return None

    def pipeline_components(self, components: Components) -> dict[str, Any]:
        """The keyword arguments that build :attr:`pipeline_class` over these components (scheduler apart)."""
        parts = {"unet": components.unet, "vae": components.vae}
        for name in (*self.text_encoder_names, *self.tokenizer_names):
            parts[name] = getattr(components, name)
        return parts

    def pipeline_extras(self) -> dict[str, Any]:
        """Further keyword arguments of :attr:`pipeline_class` (SD's safety checker switched off)."""
        return {}

    def __repr__(self) -> str:
        return f"<model family {self.name}>"


def pooled_and_penultimate(text_encoder: Any, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The penultimate layer's hidden states, and the projected pooled embedding when the encoder has one."""
    output = text_encoder(input_ids, output_hidden_states=True)
    return output.hidden_states[-2], getattr(output, "text_embeds", None)
