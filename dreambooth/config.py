"""Every training option, declared once: default, type, range, choices, label, help and group.

The tab, the HTTP API, the command line and the README's reference are all generated from the
declarations below; a config travels as JSON (``config.json`` in a model's folder).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .train.optimizers import check_paths, optimizer_choices, optimizer_help

CONFIG_VERSION = 1
FILEWORDS = "[filewords]"

_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def option(
    default: Any,
    *,
    label: str,
    help: str,
    group: str,
    choices: tuple[str, ...] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    requires: str | None = None,
) -> Any:
    """Declare one option as a dataclass field carrying its UI and validation metadata. ``requires`` names a model
    part (``Components`` attribute) without which the option does nothing: the tab hides it for such models."""
    meta = {"label": label, "help": help, "group": group, "choices": choices, "minimum": minimum, "maximum": maximum,
            "requires": requires}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Concept:
    """One subject to learn: its photos and prompts, and the class images that keep the class intact."""

    instance_dir: str = option(
        "",
        label="Instance images folder",
        group="Concept",
        help="Folder with 5-30 photos of the subject (jpg, png, webp, bmp).",
    )
    instance_prompt: str = option(
        "",
        label="Instance prompt",
        group="Concept",
        help="Prompt naming the subject with a rare token, e.g. 'photo of zwx person'. "
        "'[filewords]' is replaced by each image's caption (.txt beside it, or its file name).",
    )
    class_prompt: str = option(
        "",
        label="Class prompt",
        group="Concept",
        help="Prompt for the subject's class without the token, e.g. 'photo of a person'.",
    )
    class_dir: str = option(
        "",
        label="Class images folder",
        group="Concept",
        help="Optional folder of your own class images; missing ones are generated with the base model.",
    )
    num_class_images: int = option(
        50,
        label="Class images",
        group="Concept",
        minimum=0,
        maximum=10000,
        help="How many class images prior preservation uses; only the missing ones are generated.",
    )
    class_negative_prompt: str = option(
        "", label="Class negative prompt", group="Concept", help="Negative prompt used when generating class images."
    )
    class_guidance_scale: float = option(
        7.5,
        label="Class CFG scale",
        group="Concept",
        minimum=1.0,
        maximum=30.0,
        help="Classifier-free guidance scale for class-image generation.",
    )
    class_infer_steps: int = option(
        30,
        label="Class generation steps",
        group="Concept",
        minimum=1,
        maximum=200,
        help="Denoising steps for each generated class image.",
    )
    class_seed: int = option(
        0,
        label="Class generation seed",
        group="Concept",
        minimum=0,
        maximum=2**32 - 1,
        help="Seed of the first generated class image; the n-th uses seed + n.",
    )
    sample_prompts: list[str] = option(
        [], label="Sample prompts", group="Concept", help="Prompts rendered as previews every 'Sample every N steps'."
    )


@dataclass
class TrainConfig:
    """Everything one training run needs; the only settings file is this, as JSON."""

    version: int = option(
        CONFIG_VERSION,
        label="Config version",
        group="Model",
        minimum=1,
        maximum=CONFIG_VERSION,
        help="Schema version of this file; older files are migrated when loaded.",
    )
    model_name: str = option(
        "",
        label="Model name",
        group="Model",
        help="Name of the model's folder and of the saved checkpoints: letters, digits, '.', '_', '-'.",
    )
    source_checkpoint: str = option(
        "",
        label="Source checkpoint",
        group="Model",
        help="SD 1.x, SD 2.x or SDXL single file (.safetensors/.ckpt) or diffusers folder to start from.",
    )
    prediction_type: str = option(
        "auto",
        label="Prediction type",
        group="Model",
        choices=("auto", "epsilon", "v_prediction"),
        help="What the source's UNet predicts: 'auto' reads the file's header (or, for SD 2.x, tests the UNet as "
        "the web UI does); set it for a v-prediction model that does not say so.",
    )
    tokenizer_dir: str = option(
        "",
        label="Tokenizer folder",
        group="Model",
        help="Optional folder with the CLIP tokenizer (vocab.json, merges.txt); "
        "otherwise the Hugging Face cache or open_clip's vocabulary is used.",
    )
    model_config_dir: str = option(
        "",
        label="Model config folder",
        group="Model",
        help="Optional diffusers config folder (model_index.json, unet/, vae/, text_encoder/, "
        "scheduler/) for single files of an unusual shape; by default the family's own is used.",
    )
    output_dir: str = option(
        "",
        label="Output folder",
        group="Model",
        help="Where checkpoints are written; empty means '<model folder>/checkpoints'.",
    )
    method: str = option(
        "full",
        label="What to train",
        group="Method",
        choices=("full", "lora"),
        help="'full': fine-tune every weight and save whole checkpoints (2-7 GB, listed in the checkpoint dropdown); "
        "'lora': train small LoRA adapters and save LoRA files (a few MB, listed in the web UI's Lora tab, used "
        "as <lora:name:1> on top of any checkpoint of the family).",
    )
    lora_rank: int = option(
        16,
        label="LoRA rank",
        group="Method",
        minimum=1,
        maximum=1024,
        help="Rank (network dim) of each adapter: more learns more detail, in a bigger file.",
    )
    lora_alpha: float = option(
        16.0,
        label="LoRA alpha",
        group="Method",
        minimum=0.0,
        maximum=4096.0,
        help="Each adapter adds (alpha / rank) x up x down to its layer's weight; alpha = rank adds it at full "
        "strength, alpha = rank / 2 at half (a gentler learning rate).",
    )
    lora_layers: str = option(
        "attention_ff",
        label="LoRA layers",
        group="Method",
        choices=("attention", "attention_ff", "attention_ff_conv"),
        help="Which UNet layers get adapters: the attention projections; also the transformer blocks' "
        "feed-forward and in/out projections (kohya's default); also the ResNet and resampling convolutions "
        "(LoCon). 'Train text encoder' puts adapters on the text encoder's attention and MLP, at its own rate.",
    )
    lora_base_precision: str = option(
        "weights",
        label="LoRA base weights",
        group="Method",
        choices=("weights", "fp8"),
        help="How the model's own (frozen) weights are stored while the adapters train: 'weights' in the "
        "'Weight precision' like everything else; 'fp8' in 8-bit floats (float8_e4m3fn with a power-of-two scale per "
        "layer, kohya's --fp8_base), each layer upcast just before it runs: half the memory of bf16 (SDXL's UNet "
        "5.1 -> 2.6 GB; also the text encoders that stay on the GPU while training), for a little rounding of the "
        "base. LoRA only; the saved file does not change.",
    )

    concepts: list[Concept] = option([], label="Concepts", group="Concept", help="The subjects to learn.")

    resolution: int = option(
        512,
        label="Resolution",
        group="Images",
        minimum=64,
        maximum=2048,
        help="Training size in pixels: the side of the square, a multiple of 8 (aspect-ratio buckets have about as "
        "many pixels).",
    )
    aspect_buckets: bool = option(
        True,
        label="Aspect-ratio buckets",
        group="Images",
        help="Train each image at the shape nearest its own aspect ratio instead of a square cut from it: kohya's "
        "buckets, sides multiples of 64 from half to twice the resolution, at most resolution² pixels (SDXL at 1024: "
        "1024x1024, 1152x896, 1216x832, 832x1216 ...). Each batch is of one shape; class images are cropped to it. "
        "Square images train exactly as with this off. CUDA graphs record one shape, so with images of several "
        "shapes they are off; compile_unet compiles each shape before the first step.",
    )
    center_crop: bool = option(
        True,
        label="Centre crop",
        group="Images",
        help="Crop the centre of each image; off crops at a random place each time.",
    )
    hflip: bool = option(
        False,
        label="Horizontal flip",
        group="Images",
        help="Mirror each image at random (never use for asymmetric subjects or text).",
    )

    max_steps: int = option(
        1000,
        label="Training steps",
        group="Schedule",
        minimum=1,
        maximum=1_000_000,
        help="Optimizer steps to train; ignored when 'Epochs' is above 0.",
    )
    epochs: int = option(
        0,
        label="Epochs",
        group="Schedule",
        minimum=0,
        maximum=100_000,
        help="Train this many passes over the instance images instead of a step count (0: use steps).",
    )
    batch_size: int = option(
        1,
        label="Batch size",
        group="Schedule",
        minimum=1,
        maximum=256,
        help="Instance images per step (each paired with one class image when prior preservation is on).",
    )
    gradient_accumulation: int = option(
        1,
        label="Gradient accumulation",
        group="Schedule",
        minimum=1,
        maximum=1024,
        help="Batches summed into one optimizer step.",
    )
    learning_rate: float = option(
        2e-6,
        label="UNet learning rate",
        group="Schedule",
        minimum=0.0,
        maximum=1.0,
        help="Peak learning rate of the UNet.",
    )
    lr_scheduler: str = option(
        "constant",
        label="LR schedule",
        group="Schedule",
        choices=("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"),
        help="How the learning rate changes over the run.",
    )
    lr_warmup_steps: int = option(
        0,
        label="Warm-up steps",
        group="Schedule",
        minimum=0,
        maximum=1_000_000,
        help="Steps over which the learning rate ramps up from 0.",
    )
    lr_cycles: int = option(
        1, label="LR cycles", group="Schedule", minimum=1, maximum=1000, help="Restarts of 'cosine_with_restarts'."
    )
    lr_power: float = option(
        1.0, label="LR power", group="Schedule", minimum=0.1, maximum=10.0, help="Power of the 'polynomial' schedule."
    )

    train_text_encoder: bool = option(
        False,
        label="Train text encoder",
        group="Text encoder",
        help="Also fine-tune the text encoder (SDXL: its first, CLIP ViT-L) for better likeness, with more memory.",
    )
    text_encoder_lr: float = option(
        1e-6,
        label="Text encoder learning rate",
        group="Text encoder",
        minimum=0.0,
        maximum=1.0,
        help="Peak learning rate of the text encoder.",
    )
    text_encoder_stop: float = option(
        1.0,
        label="Stop text encoder at",
        group="Text encoder",
        minimum=0.0,
        maximum=1.0,
        help="Fraction of the run after which the text encoder is frozen.",
    )
    train_text_encoder_2: bool = option(
        False,
        label="Train second text encoder",
        group="Text encoder",
        requires="text_encoder_2",
        help="SDXL: also fine-tune its second text encoder (OpenCLIP ViT-bigG, 695M weights; much more memory).",
    )
    text_encoder_2_lr: float = option(
        1e-6,
        label="Second text encoder learning rate",
        group="Text encoder",
        requires="text_encoder_2",
        minimum=0.0,
        maximum=1.0,
        help="SDXL: peak learning rate of the second text encoder.",
    )

    optimizer: str = option(
        "adamw",
        label="Optimizer",
        group="Optimizer",
        choices=optimizer_choices(),
        help=optimizer_help(),
    )
    adam_beta1: float = option(
        0.9,
        label="Adam beta1",
        group="Optimizer",
        minimum=0.0,
        maximum=0.9999,
        help="First-moment decay (AdamW variants).",
    )
    adam_beta2: float = option(
        0.999,
        label="Adam beta2",
        group="Optimizer",
        minimum=0.0,
        maximum=0.99999,
        help="Second-moment decay (AdamW variants).",
    )
    adam_epsilon: float = option(
        1e-8,
        label="Adam epsilon",
        group="Optimizer",
        minimum=0.0,
        maximum=1.0,
        help="Denominator term (AdamW variants).",
    )
    weight_decay: float = option(
        1e-2, label="Weight decay", group="Optimizer", minimum=0.0, maximum=1.0, help="Decoupled weight decay."
    )
    max_grad_norm: float = option(
        1.0,
        label="Gradient clip",
        group="Optimizer",
        minimum=0.0,
        maximum=1000.0,
        help="Clip the gradient norm to this value (0: no clipping). With the optimizer step in the backward pass "
        "(optimizer_in_backward) the UNet's gradient is never whole, so only the text encoder's is clipped.",
    )

    mixed_precision: str = option(
        "auto",
        label="Mixed precision",
        group="Memory and speed",
        choices=("auto", "no", "fp16", "bf16"),
        help="Compute in 16 bits; 'auto' picks bf16 where the GPU has it, else fp16, and full precision on the CPU.",
    )
    attention: str = option(
        "sdpa",
        label="Attention",
        group="Memory and speed",
        choices=("sdpa", "xformers", "eager"),
        help="PyTorch's scaled-dot-product attention, xformers (when installed) or the plain kernel.",
    )
    gradient_checkpointing: bool = option(
        False,
        label="Gradient checkpointing",
        group="Memory and speed",
        help="Recompute activations in the backward pass: much less memory, ~25% slower.",
    )
    cache_latents: bool = option(
        True,
        label="Cache latents",
        group="Memory and speed",
        help="Encode every image once with the VAE (both flips), then free the VAE from the GPU.",
    )
    cache_text_embeddings: bool = option(
        True,
        label="Cache text embeddings",
        group="Memory and speed",
        help="Encode each prompt once (only while the text encoder is frozen).",
    )
    device: str = option(
        "auto",
        label="Device",
        group="Memory and speed",
        choices=("auto", "cuda", "cpu"),
        help="Where to train; 'auto' uses the GPU when there is one.",
    )
    weights_dtype: str = option(
        "auto",
        label="Weight precision",
        group="Memory and speed",
        choices=("auto", "fp32", "bf16"),
        help="bf16 keeps the UNet's weights in bf16 and writes every update with stochastic rounding (half the "
        "memory, no autocast); 'auto' picks bf16 on GPUs that have it, else fp32.",
    )
    optimizer_in_backward: bool = option(
        False,
        label="Fused optimizer step",
        group="Memory and speed",
        help="Update each group of UNet weights as soon as its gradients exist, then free them: the full gradient "
        "never exists (-1.7 GB for SD 1.5). No gradient clipping of the UNet, no gradient accumulation.",
    )
    channels_last: bool = option(
        True,
        label="Channels-last layout",
        group="Memory and speed",
        help="Store the UNet's convolution weights and activations channels-last on the GPU (the CPU always keeps "
        "the plain layout): faster at small batches, slower at large ones unless compile_unet is on too, whose "
        "group norms then run in channels-last order. Turn it off for large batches without compile_unet.",
    )
    cuda_graphs: bool = option(
        True,
        label="CUDA graphs",
        group="Memory and speed",
        help="Record the UNet's forward and backward once and replay them (several times faster at small batches); "
        "with the fused optimizer step, the whole step (gradient checkpointing included) is recorded. Used on CUDA "
        "with bf16 weights, a frozen text encoder, instance images of one aspect-ratio bucket, and without gradient "
        "checkpointing unless the optimizer step is fused; otherwise the UNet runs as usual.",
    )
    compile_optimizer: bool = option(
        True,
        label="Compile the optimizer",
        group="Memory and speed",
        help="Fuse the update of bf16 weights (AdamW, 8-bit AdamW, Adafactor) into few GPU kernels with torch.compile "
        "when Triton is installed (~20 s once per run).",
    )
    compile_unet: bool = option(
        False,
        label="Compile the UNet",
        group="Memory and speed",
        help="Compile the UNet block by block with torch.compile (torch 2.2 or later; Triton on CUDA, a C++ compiler "
        "on the CPU): more steps a second at every batch size, for minutes of compiling before the first step, so it "
        "pays in long runs only. If compiling fails, the UNet "
        "runs as usual and the log says why. With channels_last its group norms run in channels-last order.",
    )
    log_every: int = option(
        10,
        label="Report every N steps",
        group="Memory and speed",
        minimum=1,
        maximum=1000,
        help="Read the loss back from the GPU every N steps (reading it every step stalls the GPU); "
        "the progress and the loss plot then move N steps at a time.",
    )

    prior_preservation: bool = option(
        True, label="Prior preservation", group="Loss", help="Train on class images too, so the class keeps its look."
    )
    prior_loss_weight: float = option(
        1.0,
        label="Prior loss weight",
        group="Loss",
        minimum=0.0,
        maximum=100.0,
        help="Weight of the class-image loss against the instance loss.",
    )
    offset_noise: float = option(
        0.0,
        label="Offset noise",
        group="Loss",
        minimum=0.0,
        maximum=1.0,
        help="Add this much per-channel constant noise (helps very dark/bright images).",
    )
    min_snr_gamma: float = option(
        0.0,
        label="Min-SNR gamma",
        group="Loss",
        minimum=0.0,
        maximum=100.0,
        help="Weight each sample's loss by min(SNR, gamma) (5 is usual; 0: off).",
    )
    seed: int = option(
        0,
        label="Seed",
        group="Loss",
        minimum=0,
        maximum=2**32 - 1,
        help="Seed of data order, noise and timesteps: the same seed gives the same run.",
    )

    save_every: int = option(
        500,
        label="Save every N steps",
        group="Saving",
        minimum=0,
        maximum=1_000_000,
        help="Write a checkpoint every N steps (0: only at the end).",
    )
    save_format: str = option(
        "safetensors",
        label="File format",
        group="Saving",
        choices=("safetensors", "ckpt"),
        help="'.safetensors' (safe, fast) or the legacy pickled '.ckpt'.",
    )
    save_dtype: str = option(
        "fp16",
        label="Saved precision",
        group="Saving",
        choices=("fp16", "bf16", "fp32"),
        help="Precision of the saved weights (fp16 halves the file).",
    )
    state_every: int = option(
        0,
        label="Resume point every N steps",
        group="Saving",
        minimum=0,
        maximum=1_000_000,
        help="Write a resume snapshot (weights, optimizer, schedule, RNG, data order) every N steps; "
        "0 writes one only when a run is cancelled.",
    )
    keep_states: int = option(
        1, label="Resume points kept", group="Saving", minimum=1, maximum=100, help="How many resume snapshots to keep."
    )

    sample_every: int = option(
        0,
        label="Sample every N steps",
        group="Samples",
        minimum=0,
        maximum=1_000_000,
        help="Render the concepts' sample prompts every N steps (0: never).",
    )
    sample_negative_prompt: str = option(
        "", label="Sample negative prompt", group="Samples", help="Negative prompt of the previews."
    )
    sample_guidance_scale: float = option(
        7.5,
        label="Sample CFG scale",
        group="Samples",
        minimum=1.0,
        maximum=30.0,
        help="Classifier-free guidance of the previews.",
    )
    sample_steps: int = option(
        20, label="Sample steps", group="Samples", minimum=1, maximum=200, help="Denoising steps of each preview."
    )
    sample_seed: int = option(
        0,
        label="Sample seed",
        group="Samples",
        minimum=0,
        maximum=2**32 - 1,
        help="Seed of the previews (the same seed each time, so they are comparable).",
    )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Validate a JSON-like dict (migrating old versions) into a config; errors name the field."""
        if not isinstance(data, dict):
            raise ConfigError("A config must be a JSON object.", "Start from the one `python -m dreambooth` writes.")
        data = migrate(dict(data))
        return _build(cls, data, "")

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-ready data."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class OptionSpec:
    """What a front end needs to render and check one option."""

    name: str
    type: str
    default: Any
    label: str
    help: str
    group: str
    choices: tuple[str, ...] | None
    minimum: float | None
    maximum: float | None
    requires: str | None = None


def option_specs(cls: type = TrainConfig) -> list[OptionSpec]:
    """The declared options of ``TrainConfig`` or ``Concept``, in declaration order."""
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        specs.append(OptionSpec(name=f.name, type=_type_name(hints[f.name]), default=default, **f.metadata))
    return specs


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is list:
        (inner,) = typing.get_args(hint)
        return f"list[{_type_name(inner)}]"
    return hint.__name__


MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}
"""``MIGRATIONS[v]`` turns a version-``v`` dict into a version-``v + 1`` dict."""


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Bring an older config up to ``CONFIG_VERSION``; newer ones are refused."""
    version = data.get("version", CONFIG_VERSION)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ConfigError(f"'version' must be a whole number, got {version!r}.")
    if version > CONFIG_VERSION:
        raise ConfigError(
            f"This config is version {version}; this extension reads up to {CONFIG_VERSION}.", "Update the extension."
        )
    while version < CONFIG_VERSION:
        if version not in MIGRATIONS:
            raise ConfigError(f"Config version {version} cannot be migrated.", "Create the model again.")
        data = MIGRATIONS[version](data)
        version += 1
        data["version"] = version
    return data


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"Unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(where + k for k in unknown)}.",
            f"Known settings: {', '.join(known)}.",
        )
    values = {}
    for name, f in known.items():
        if name not in data:
            continue
        values[name] = _check(hints[name], data[name], where + name, f.metadata)
    return cls(**values)


def _check(hint: Any, value: Any, name: str, meta: dict[str, Any]) -> Any:
    origin = typing.get_origin(hint)
    if origin is list:
        (inner,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"'{name}' must be a list, got {type(value).__name__}.")
        if dataclasses.is_dataclass(inner):
            return [
                _build(inner, item, f"{name}[{i}].")
                if isinstance(item, dict)
                else _fail(f"'{name}[{i}]' must be an object.")
                for i, item in enumerate(value)
            ]
        return [_check(inner, item, f"{name}[{i}]", {}) for i, item in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{name}' must be true or false, got {value!r}.")
        return value
    if hint is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"'{name}' must be a whole number, got {value!r}.")
        value = int(value)
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{name}' must be a number, got {value!r}.")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{name}' must be text, got {value!r}.")
    lo, hi = meta.get("minimum"), meta.get("maximum")
    if lo is not None and value < lo or hi is not None and value > hi:
        raise ConfigError(f"'{name}' must be between {lo:g} and {hi:g}, got {value!r}.")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"'{name}' must be one of {', '.join(choices)}; got {value!r}.")
    return value


def _fail(message: str) -> Any:
    raise ConfigError(message)


def check_model_name(name: str) -> str:
    """Refuse names that are empty, reach outside the models folder or that Windows cannot store."""
    if not _MODEL_NAME.match(name) or name.endswith(".") or name.split(".")[0].upper() in _WINDOWS_RESERVED:
        raise ConfigError(
            f"Model name {name!r} is not allowed.",
            "Use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit.",
        )
    return name


def validate_for_training(config: TrainConfig) -> list[str]:
    """Checks that need more than one field; raises on errors, returns warnings for the log and the tab."""
    check_model_name(config.model_name)
    if not config.source_checkpoint:
        raise ConfigError("'source_checkpoint' is empty.", "Pick the checkpoint to start from.")
    if config.resolution % 8:
        raise ConfigError(f"'resolution' must be a multiple of 8, got {config.resolution}.")
    if not config.concepts:
        raise ConfigError("There is no concept to train.", "Add one with an instance folder and an instance prompt.")
    warnings = []
    for i, concept in enumerate(config.concepts):
        label = f"concepts[{i}]"
        if not concept.instance_dir:
            raise ConfigError(f"'{label}.instance_dir' is empty.", "Name the folder with the subject's photos.")
        if not concept.instance_prompt:
            raise ConfigError(f"'{label}.instance_prompt' is empty.", "Write e.g. 'photo of zwx person'.")
        if config.prior_preservation:
            if not concept.class_prompt and not concept.class_dir:
                raise ConfigError(
                    f"'{label}.class_prompt' is empty while prior preservation is on.",
                    "Write e.g. 'photo of a person', or turn prior preservation off.",
                )
            if concept.class_dir and _same_folder(concept.class_dir, concept.instance_dir):
                raise ConfigError(
                    f"'{label}.class_dir' is the instance folder ({concept.instance_dir}).",
                    "Class images must be other members of the class: pick another folder or leave it empty.",
                )
        if FILEWORDS not in concept.instance_prompt and not rare_tokens(concept.instance_prompt, concept.class_prompt):
            warnings.append(
                f"{label}: the instance prompt {concept.instance_prompt!r} has no word that the class prompt "
                "lacks; add a rare token (e.g. 'zwx') or the subject will overwrite the whole class."
            )
    if config.optimizer_in_backward and config.gradient_accumulation > 1:
        raise ConfigError(
            "'optimizer_in_backward' updates weights during the backward pass, so it cannot "
            "accumulate gradients over several batches.",
            "Set 'gradient_accumulation' to 1.",
        )
    check_paths(config.optimizer, requested_update_paths(config))
    if config.method == "lora" and config.save_format != "safetensors":
        raise ConfigError("LoRA files are written as .safetensors only (the web UI's Lora reads that format).",
                          "Set 'save_format' to safetensors.")
    if config.lora_base_precision == "fp8" and config.method != "lora":
        raise ConfigError("'lora_base_precision' fp8 stores the frozen base weights of a LoRA run in 8 bits; a full "
                          "fine-tune trains every weight, so none are frozen.",
                          "Set 'method' to lora, or 'lora_base_precision' to weights.")
    if (config.train_text_encoder or config.train_text_encoder_2) and config.cache_text_embeddings:
        warnings.append("Text embeddings are not cached while the text encoder trains.")
    return warnings


def requested_update_paths(config: TrainConfig) -> list[str]:
    """The update paths (``train/optimizers.py``) that ``config`` names outright: bf16 or fp32 weights, the step in
    the backward pass, a trained text encoder (torch's optimizer). 'auto' weights and ``cuda_graphs`` name none: they
    take a path the optimizer runs."""
    paths = []
    if config.weights_dtype == "bf16":
        paths.append("flat")
    if config.weights_dtype == "fp32" and not config.optimizer_in_backward:
        paths.append("torch")
    if config.optimizer_in_backward:
        paths.append("backward")
    if config.train_text_encoder or config.train_text_encoder_2:
        paths.append("torch")
    return paths


def rare_tokens(instance_prompt: str, class_prompt: str) -> list[str]:
    """Words of the instance prompt that the class prompt does not have: the identifier the model learns."""
    class_words = set(re.findall(r"\w+", class_prompt.lower()))
    stop = {"a", "an", "the", "of", "photo", "picture", "image", "in", "on", "with"}
    return [w for w in re.findall(r"\w+", instance_prompt.lower()) if w not in class_words and w not in stop]


def _same_folder(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def load_config(path: str | os.PathLike[str]) -> TrainConfig:
    """Read and validate ``config.json``; a broken file gets an error naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"Config file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"Config file {path} cannot be read: {exc}.", "Fix the JSON or create the model again."
        ) from None
    return TrainConfig.from_dict(data)


def save_config(config: TrainConfig, path: str | os.PathLike[str]) -> None:
    """Write the config as indented JSON, atomically."""
    from .fileio import write_atomic

    text = json.dumps(config.to_dict(), indent=2)
    write_atomic(Path(path), lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))
