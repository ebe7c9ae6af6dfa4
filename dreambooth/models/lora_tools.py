"""``python -m dreambooth lora merge`` and ``lora extract``: bake a LoRA into a checkpoint, and pull a LoRA out of
a full fine-tune.

Merge: every layer of a kohya-layout LoRA (``models/lora_file.py``) is added to the base's weight of the same key
stem, ``W + strength · (alpha / rank) · up @ down``, and the result is written as one checkpoint in the original
layout (``models/export.py``), with the ``.yaml`` the web UI needs beside it when the engine would write one. A LoRA
with a layer the base lacks, or of another shape, is refused before anything is written.

Extract: the difference between a fine-tuned model and its source, layer by layer, cut to rank R by a truncated SVD
(a conv kernel flattened to ``[out, in·kh·kw]``), written as a LoRA whose ``(alpha / R) · up @ down`` is that rank-R
approximation.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..errors import ConfigError, ModelFormatError
from ..fileio import write_atomic
from .export import SAVE_DTYPES, checkpoint_tensors, config_metadata, modelspec, save_checkpoint_for_hosts
from .families import ModelFamily
from .layout import unet_module_to_ldm
from .load import LoadedModel, load_model
from .lora_file import LoraLayer, lora_metadata, lora_name, lora_tensors, part_modules, read_lora
from .read import fingerprint

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
SHOWN_KEYS = 5
"""How many unmatched keys an error names."""
ADAPTABLE = (torch.nn.Linear, torch.nn.Conv2d)


@dataclass(frozen=True)
class Target:
    """One Linear or Conv2d of a model that a LoRA layer can change: which part it is in, and its module path."""

    part: str
    path: str
    module: torch.nn.Module

    @property
    def weight(self) -> torch.Tensor:
        """The module's weight, [out, in] or [out, in, kh, kw]."""
        return self.module.weight


@dataclass(frozen=True)
class Merged:
    """What :func:`merge_lora` wrote: the checkpoint, its ``.yaml`` (or None), how many layers it baked in, and why
    the web UI gets no yaml when it cannot build the model ('' otherwise)."""

    path: Path
    yaml: Path | None
    layers: int
    note: str = ""


def lora_targets(family: ModelFamily, loaded: LoadedModel, *, any_unet_naming: bool = False) -> dict[str, Target]:
    """Every Linear and Conv2d of the UNet and the text encoders, by the key stem a LoRA file of ours gives it;
    with ``any_unet_naming`` a UNet layer is found under diffusers' name and the single file's alike, as the web UI
    finds the layers of other tools' files (and of ours from before a layout's names changed)."""
    config = loaded.components.unet.config
    targets = {}
    for part, path, module in _adaptable_modules(loaded):
        target = Target(part, path, module)
        targets[lora_name(family, part, path, config)] = target
        if any_unet_naming and part == "unet":
            for name in (path, unet_module_to_ldm(path, config)):
                targets.setdefault(family.lora_prefixes["unet"] + name.replace(".", "_"), target)
    return targets


def _adaptable_modules(loaded: LoadedModel) -> Iterator[tuple[str, str, torch.nn.Module]]:
    for part, model in part_modules(loaded.components):
        for path, module in model.named_modules():
            if isinstance(module, ADAPTABLE):
                yield part, path, module


# ---- merge ---------------------------------------------------------------------------------------------------------

def merge_lora(base: Path, lora: Path, out: Path, strength: float = 1.0, dtype: str = "fp16",
               tokenizer_dir: str = "", config_dir: str = "") -> Merged:
    """Write ``out``: ``base`` with every layer of ``lora`` added at ``strength``; all of it or nothing."""
    base, lora, out = Path(base), Path(lora), Path(out)
    _check_new_output(out, CHECKPOINT_SUFFIXES)
    layers, lora_header = read_lora(lora)
    with tempfile.TemporaryDirectory() as cache:
        loaded = load_model(base, cache_dir=Path(cache), tokenizer_dir=tokenizer_dir, config_dir=config_dir)
    deltas = matched_deltas(loaded, layers, lora)
    with torch.no_grad():
        for target, delta in deltas:
            target.weight.add_(delta.to(target.weight.dtype), alpha=strength)
    description = f"{base.name} with the LoRA {lora.name} merged in at strength {strength:g}"
    yaml, note = _write_merged(loaded, out, dtype, tokenizer_dir, description,
                               _merge_summary(base, lora, strength, layers, lora_header))
    return Merged(out, yaml, len(deltas), note)


def matched_deltas(loaded: LoadedModel, layers: Mapping[str, LoraLayer], lora: Path
                   ) -> list[tuple[Target, torch.Tensor]]:
    """Each LoRA layer's module in the base and its change at strength 1, shaped as the weight; a
    ``ModelFormatError`` naming the first layers that have no module in the base, or one of another shape."""
    targets = lora_targets(loaded.family, loaded, any_unet_naming=True)
    missing = [stem for stem in layers if stem not in targets]
    if missing:
        raise ModelFormatError(
            f"{lora.name} does not fit this {loaded.family.label} model: {len(missing)} of its {len(layers)} layers "
            f"name no layer of it ({_first(missing)}).",
            f"Merge a LoRA trained on this model's family ({loaded.family.label}), in kohya's layout "
            "(lora_unet_…, lora_te…); nothing was written.")
    matched, misfits = [], []
    for stem, layer in layers.items():
        target = targets[stem]
        delta = _shaped_like(layer.delta(), target.weight)
        if delta is None:
            misfits.append(f"{stem} {tuple(layer.delta().shape)} vs {tuple(target.weight.shape)}")
        else:
            matched.append((target, delta))
    if misfits:
        raise ModelFormatError(
            f"{lora.name} does not fit this {loaded.family.label} model: {len(misfits)} layers have another shape "
            f"({_first(misfits)}).",
            "It was trained on a model of another size or version; merge it into that one. Nothing was written.")
    return matched


def _shaped_like(delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """``delta`` as ``weight``'s shape, where only a 1×1 kernel's two trailing ones differ (a 1×1 conv written as a
    Linear, or the reverse); None when it does not fit."""
    if delta.shape == weight.shape:
        return delta
    if delta.numel() == weight.numel() and delta.shape[:2] == weight.shape[:2] and max(delta.ndim, weight.ndim) == 4:
        return delta.reshape(weight.shape)
    return None


def _merge_summary(base: Path, lora: Path, strength: float, layers: Mapping[str, LoraLayer],
                   lora_header: Mapping[str, str]) -> dict[str, object]:
    """The ``dreambooth.training`` entry of a merged checkpoint."""
    summary: dict[str, object] = {
        "extension": f"dreambooth {__version__}",
        "base_model": base.name,
        "base_model_id": fingerprint(base),
        "merged_lora": lora.name,
        "merged_lora_id": fingerprint(lora),
        "merged_strength": strength,
        "merged_layers": len(layers),
    }
    if "dreambooth.training" in lora_header:
        try:
            summary["lora_training"] = json.loads(lora_header["dreambooth.training"])
        except json.JSONDecodeError:
            pass
    return summary


def _write_merged(loaded: LoadedModel, out: Path, dtype: str, tokenizer_dir: str, description: str,
                  training: Mapping[str, object]) -> tuple[Path | None, str]:
    """Write the checkpoint, after the web UI's ``.yaml`` when its family needs one (as ``engine._save`` does);
    returns the yaml written (or None) and, when the web UI cannot build the model, why."""
    family, prediction = loaded.family, loaded.components.prediction_type
    tensors = checkpoint_tensors(loaded.components, loaded.extra_tensors, SAVE_DTYPES[dtype], family)
    metadata = modelspec(family, prediction, model_resolution(loaded), out.stem, training)
    metadata["modelspec.description"] = description
    metadata.update(config_metadata(loaded.diffusers_config))
    return save_checkpoint_for_hosts(out, tensors, metadata, family, loaded.diffusers_config, prediction,
                                     tokenizer_dir)


def model_resolution(loaded: LoadedModel) -> int:
    """The side in pixels the UNet's default sample size stands for (its latent side × the VAE's downscaling)."""
    components = loaded.components
    return components.unet.config.sample_size * 2 ** (len(components.vae.config.block_out_channels) - 1)


# ---- extract -------------------------------------------------------------------------------------------------------

def extract_lora(base: Path, tuned: Path, out: Path, rank: int, alpha: float | None = None,
                 layers: str = "attention", text_encoder: bool = False, dtype: str = "fp16",
                 tokenizer_dir: str = "", config_dir: str = "") -> Path:
    """Write ``out``: a LoRA of ``rank`` whose layers approximate ``tuned`` − ``base`` on the UNet's ``layers``
    (``train.trained.UNET_LAYERS``) and, with ``text_encoder``, every text encoder's attention and MLP."""
    from .adapters import UNET_LAYERS

    base, tuned, out = Path(base), Path(tuned), Path(out)
    _check_new_output(out, (".safetensors",))
    if layers not in UNET_LAYERS:
        raise ConfigError(f"--layers {layers!r} is none of {', '.join(UNET_LAYERS)}.", "Pick one of those.")
    if rank < 1:
        raise ConfigError(f"--rank {rank} is below 1.", "Give a rank of 1 or more.")
    alpha = float(rank if alpha is None else alpha)
    with tempfile.TemporaryDirectory() as cache:
        source = load_model(base, cache_dir=Path(cache), tokenizer_dir=tokenizer_dir, config_dir=config_dir)
        fine_tuned = load_model(tuned, cache_dir=Path(cache), tokenizer_dir=tokenizer_dir, config_dir=config_dir)
    pairs = paired_targets(source, fine_tuned, layers, text_encoder)
    _check_rank(pairs, rank)
    extracted = {}
    for stem, (before, after) in pairs.items():
        difference = after.weight.detach().float() - before.weight.detach().float()
        if torch.count_nonzero(difference):  # a layer the fine-tune left alone has nothing to extract
            extracted[stem] = low_rank_layer(difference, rank, alpha)
    if not extracted:
        raise ModelFormatError(f"{tuned.name} has the same weights as {base.name} in every layer asked for.",
                               "Give the fine-tuned model and the model it was trained from; nothing was written.")
    return _write_extracted(source, out, extracted, dtype, {
        "extension": f"dreambooth {__version__}", "base_model": base.name, "base_model_id": fingerprint(base),
        "extracted_from": tuned.name, "extracted_from_id": fingerprint(tuned), "rank": rank, "alpha": alpha,
        "lora_layers": layers, "train_text_encoder": text_encoder, "ss_sd_model_name": base.name,
    })


def paired_targets(base: LoadedModel, tuned: LoadedModel, layers: str, text_encoder: bool
                   ) -> dict[str, tuple[Target, Target]]:
    """Each targeted layer's module in the base and in the tuned model, by key stem; a ``ModelFormatError`` when the
    two are not the same model family and shape."""
    from .adapters import TEXT_ENCODER_LAYERS, UNET_LAYERS, targeted

    if base.family is not tuned.family:
        raise ModelFormatError(
            f"The base is {base.family.label} and the tuned model {tuned.family.label}: a LoRA is the difference "
            "between a fine-tune and the model it was trained from.", "Give two models of one family; nothing was "
            "written.")
    wanted = {"unet": UNET_LAYERS[layers], **({name: TEXT_ENCODER_LAYERS for name in base.components.text_encoders}
                                              if text_encoder else {})}
    before, after = lora_targets(base.family, base), lora_targets(tuned.family, tuned)
    misfits = [f"{stem} {tuple(t.weight.shape)} vs {tuple(after[stem].weight.shape) if stem in after else 'absent'}"
               for stem, t in before.items() if stem not in after or after[stem].weight.shape != t.weight.shape]
    misfits += [f"{stem} absent vs {tuple(t.weight.shape)}" for stem, t in after.items() if stem not in before]
    if misfits:
        raise ModelFormatError(
            f"The tuned model is not the same shape as the base ({len(misfits)} layers differ: {_first(misfits)}).",
            "Give the fine-tuned model and the very model it was trained from; nothing was written.")
    return {stem: (target, after[stem]) for stem, target in before.items()
            if target.part in wanted and targeted(target.path, wanted[target.part])}


def _check_rank(pairs: Mapping[str, tuple[Target, Target]], rank: int) -> None:
    from .adapters import width_of

    if not pairs:
        raise ConfigError("The model has none of the layers asked for.", "Pick other --layers.")
    width, stem = min((width_of(before.module), stem) for stem, (before, _after) in pairs.items())
    if rank > width:
        raise ConfigError(
            f"--rank {rank} is more than the width of layer {stem} ({width}): a LoRA layer cannot have a higher rank "
            "than the layer it changes (min(outputs, inputs × kernel)).",
            f"Give --rank {width} or less, or fewer --layers; nothing was written.")


def low_rank_layer(difference: torch.Tensor, rank: int, alpha: float) -> LoraLayer:
    """The LoRA layer whose ``delta()`` is the best rank-``rank`` approximation of ``difference`` (truncated SVD of
    it as [out, in·kh·kw]; the singular values split evenly between up and down)."""
    flat = difference.reshape(difference.shape[0], -1).float()
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    root = (s[:rank] * rank / alpha).sqrt()  # (alpha / rank) · up @ down = u · s · vh
    up, down = u[:, :rank] * root, root[:, None] * vh[:rank]
    if difference.ndim == 4:
        return LoraLayer(down.reshape(rank, *difference.shape[1:]), up[:, :, None, None], alpha)
    return LoraLayer(down, up, alpha)


def _write_extracted(loaded: LoadedModel, out: Path, layers: Mapping[str, LoraLayer], dtype: str,
                     training: Mapping[str, object]) -> Path:
    from safetensors.torch import save_file

    tensors = lora_tensors(layers, SAVE_DTYPES[dtype])
    metadata = lora_metadata(loaded.family, loaded.components.prediction_type, model_resolution(loaded), out.stem,
                             out.stem, layers, training)
    return write_atomic(out, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


# ---- shared --------------------------------------------------------------------------------------------------------

def _check_new_output(out: Path, suffixes: tuple[str, ...]) -> None:
    if out.suffix not in suffixes:
        raise ModelFormatError(f"{out.name} must end in {' or '.join(suffixes)}.", "Pick an output file name so.")
    if out.exists():
        raise ModelFormatError(f"{out} exists already.", "Pick a new name; nothing was overwritten.")


def _first(items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN_KEYS])
    return shown + (f", and {len(items) - SHOWN_KEYS} more" if len(items) > SHOWN_KEYS else "")
