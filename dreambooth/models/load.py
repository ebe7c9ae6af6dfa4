"""Load the source model into diffusers components, offline.

A single file goes through diffusers' own single-file loader, handed a local config folder (the family's,
shipped in ``models/configs/``, or the one the config names) so it never asks the hub. The components are
kept in the model folder's ``working/`` (diffusers layout) and reused by the next run of the same source.
Tensors of the source that are not weights of the three models (the noise schedule's buffers) are kept too,
so that an export carries every tensor of the original file.

A model whose configs are not the family's stock ones (a tiny or otherwise re-shaped model) carries its config
folder inside the file: the safetensors header key ``dreambooth.diffusers_config`` (``export.CONFIG_METADATA_KEY``)
holds the JSON of ``model_index.json`` and the unet/vae/text_encoder/scheduler configs. With no
``model_config_dir``, such a file is loaded through a config folder rebuilt from that key in the cache folder.
"""

from __future__ import annotations

import inspect
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelFormatError
from ..fileio import write_atomic
from .components import Components
from .export import CONFIG_METADATA_KEY
from .layout import TEXT_ENCODER_PREFIX, UNET_PREFIX, VAE_PREFIX
from .read import SINGLE_FILE_SUFFIXES, detect_family, fingerprint, read_keys, read_tensors
from .tokenizer import find_tokenizer_dir, load_clip_tokenizer

CONFIGS_DIR = Path(__file__).parent / "configs"
DROPPED_PREFIXES = ("model_ema.",)
"""Keys never carried over: the EMA copy of the untrained UNet would shadow the trained weights in loaders that
prefer EMA weights, and it doubles the file."""
MODEL_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")
COMPONENT_PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": TEXT_ENCODER_PREFIX}
CONFIG_FILES = (
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
)
"""The files of a diffusers config folder that the single-file loader reads (the tokenizer comes separately)."""
EMBEDDED_CONFIG_DIR = "embedded-config"
"""Where, under the cache folder, the config folder carried by a file's header is rebuilt."""
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
TEXT_ENCODER_SHAPE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
)
"""What makes one CLIP text encoder differ from another for SD (token ids and projection sizes do not)."""


@dataclass
class LoadedModel:
    """The components to train, plus what the export needs to rebuild the original file."""

    components: Components
    family: str
    source_id: str
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    diffusers_config: dict[str, dict] | None = None
    """The config folder's files (``CONFIG_FILES`` → JSON) when they differ from the family's stock folder:
    exports carry them in their header, and the web UI needs a ``.yaml`` for them. None for a stock model."""
    stored_dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    """Per component ('unet', 'vae', 'text_encoder'), the precision its working copy is written in: fp16 (or bf16)
    when every weight of it in a single-file source had it (most checkpoints people share), as nothing finer
    exists to keep; fp32 when absent (mixed or fp32 weights, diffusers folders)."""


def load_model(
    source: str | Path, working_dir: Path, cache_dir: Path, tokenizer_dir: str = "", config_dir: str = ""
) -> LoadedModel:
    """Load ``source`` (single file or diffusers folder), reusing ``working_dir`` when it holds the same source."""
    source = Path(source)
    if not source.exists():
        raise ModelFormatError(
            f"Source checkpoint {source} does not exist.",
            "Pick a checkpoint the web UI lists, or give the full path to one.",
        )
    source_id = fingerprint(source)
    stamp = working_dir / "source.json"
    stamped = json.loads(stamp.read_text()) if stamp.is_file() else {}
    if (stamped.get("source_id") == source_id and "diffusers_config" in stamped
            and stamped.get("working_format") == WORKING_FORMAT):
        loaded = _load_diffusers_folder(working_dir, cache_dir, tokenizer_dir)
        extra_path = working_dir / "extra_tensors.safetensors"
        if extra_path.is_file():
            from safetensors.torch import load_file

            loaded.extra_tensors = load_file(str(extra_path))
        loaded.source_id = source_id
        loaded.family = stamped.get("family", loaded.family)
        loaded.diffusers_config = stamped["diffusers_config"]
        _to_fp32(loaded)
        return loaded
    if source.is_dir():
        loaded = _load_diffusers_folder(source, cache_dir, tokenizer_dir)
    elif source.suffix.lower() in SINGLE_FILE_SUFFIXES:
        loaded = _load_single_file(source, cache_dir, tokenizer_dir, config_dir)
    else:
        raise ModelFormatError(
            f"{source} is neither a checkpoint file ({', '.join(SINGLE_FILE_SUFFIXES)}) nor a diffusers folder.",
            "Pick a .safetensors or .ckpt file.",
        )
    loaded.source_id = source_id
    _save_working(loaded, working_dir)  # in the source's precision: an fp16 file's copy takes half the disk
    _to_fp32(loaded)
    return loaded


def _to_fp32(loaded: LoadedModel) -> None:
    """fp16 files still train with fp32 master weights (widening is exact: the copy on disk loses nothing)."""
    for model in (loaded.components.unet, loaded.components.vae, loaded.components.text_encoder):
        model.to(torch.float32)


def _load_single_file(path: Path, cache_dir: Path, tokenizer_dir: str, config_dir: str) -> LoadedModel:
    family = detect_family(read_keys(path), path)
    if config_dir:
        config_folder = Path(config_dir)
    else:
        embedded = embedded_config(path)
        config_folder = CONFIGS_DIR / family
        if embedded is not None:
            config_folder = write_config_folder(embedded, cache_dir / EMBEDDED_CONFIG_DIR)
    if not (config_folder / "model_index.json").is_file():
        raise ModelFormatError(
            f"Model config folder {config_folder} has no model_index.json.",
            "Point 'model_config_dir' at a diffusers config folder, or leave it empty.",
        )
    tokenizer = load_clip_tokenizer(find_tokenizer_dir(tokenizer_dir, cache_dir / "clip-tokenizer"))
    tensors = read_tensors(path)
    extra = {k: v for k, v in tensors.items() if not k.startswith(MODEL_PREFIXES + DROPPED_PREFIXES)}
    stored_dtypes = _half_precision_components(tensors)
    readable = path
    if path.suffix.lower() != ".safetensors":
        readable = cache_dir / f"{path.stem}.converting.safetensors"
        _save_safetensors({k: v for k, v in tensors.items() if k.startswith(MODEL_PREFIXES)}, readable)
    del tensors
    try:
        components = _from_single_file(readable, config_folder, tokenizer)
    except ModelFormatError:
        raise
    except Exception as exc:  # diffusers' loader raises many types for a file of the wrong shape
        raise ModelFormatError(
            f"{path} could not be loaded as {family.upper()} with the configs in {config_folder} "
            f"({type(exc).__name__}: {exc}).",
            "If it is a model of an unusual shape, set 'model_config_dir' to its diffusers config folder.",
        ) from None
    finally:
        if readable != path:
            readable.unlink(missing_ok=True)
    return LoadedModel(
        components=components,
        family=family,
        source_id="",
        extra_tensors=extra,
        diffusers_config=_unless_stock(read_config_folder(config_folder), family),
        stored_dtypes=stored_dtypes,
    )


def _half_precision_components(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.dtype]:
    """The components whose weights are all fp16, or all bf16, in a single file: component → that dtype. The text
    encoder's ``position_ids`` (indices, stored as floats in some files) are not weights and do not count."""
    found = {}
    for name, prefix in COMPONENT_PREFIXES.items():
        dtypes = {
            value.dtype
            for key, value in tensors.items()
            if key.startswith(prefix) and value.is_floating_point() and not key.endswith("position_ids")
        }
        if len(dtypes) == 1 and next(iter(dtypes)) in (torch.float16, torch.bfloat16):
            found[name] = next(iter(dtypes))
    return found


def _from_single_file(path: Path, config_folder: Path, tokenizer) -> Components:
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(
        str(path),
        config=str(config_folder),
        local_files_only=True,
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return Components(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=tokenizer,
        scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
    )


def _load_diffusers_folder(folder: Path, cache_dir: Path, tokenizer_dir: str) -> LoadedModel:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    missing = [name for name in ("unet", "vae", "text_encoder", "scheduler") if not (folder / name).is_dir()]
    if missing:
        raise ModelFormatError(
            f"{folder} is not a diffusers Stable Diffusion folder (no {', '.join(missing)}).",
            "Pick the folder that holds model_index.json, or a single .safetensors file.",
        )
    if (folder / "text_encoder_2").is_dir():
        raise ModelFormatError(f"{folder} is an SDXL model; SDXL is not supported yet.", "Pick an SD 1.x model.")
    text_config = json.loads((folder / "text_encoder" / "config.json").read_text())
    if text_config.get("hidden_act") == "gelu":
        raise ModelFormatError(
            f"{folder} is an SD 2.x model (OpenCLIP text encoder); SD 2.x is not supported yet.",
            "Pick an SD 1.x model.",
        )
    tokenizer_folder = folder / "tokenizer"
    if tokenizer_dir or not (tokenizer_folder / "vocab.json").is_file():
        tokenizer_folder = find_tokenizer_dir(tokenizer_dir, cache_dir / "clip-tokenizer")
    components = Components(
        unet=UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", local_files_only=True),
        vae=AutoencoderKL.from_pretrained(str(folder), subfolder="vae", local_files_only=True),
        text_encoder=CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder", local_files_only=True),
        tokenizer=load_clip_tokenizer(tokenizer_folder),
        scheduler=DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler", local_files_only=True),
    )
    if components.unet.config.cross_attention_dim != components.text_encoder.config.hidden_size:
        raise ModelFormatError(
            f"{folder}: the UNet's cross-attention width does not match the text encoder.",
            "This is not an SD 1.x model we can train.",
        )
    return LoadedModel(
        components=components,
        family="sd1",
        source_id="",
        diffusers_config=_unless_stock(read_config_folder(folder), "sd1"),
    )


def embedded_config(path: Path) -> dict[str, dict] | None:
    """The config folder a single file carries in its safetensors header, or None (none there, or a .ckpt)."""
    if path.suffix.lower() != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            text = (handle.metadata() or {}).get(CONFIG_METADATA_KEY)
    except Exception:  # noqa: BLE001 (an unreadable header is reported by the loader that follows)
        return None
    if not text:
        return None
    try:
        configs = json.loads(text)
    except json.JSONDecodeError:
        raise ModelFormatError(
            f"{path}: the header's {CONFIG_METADATA_KEY} is not valid JSON.",
            "Set 'model_config_dir' to the model's diffusers config folder.",
        ) from None
    missing = [name for name in CONFIG_FILES if not isinstance(configs.get(name), dict)]
    if missing:
        raise ModelFormatError(
            f"{path}: the header's {CONFIG_METADATA_KEY} lacks {', '.join(missing)}.",
            "Set 'model_config_dir' to the model's diffusers config folder.",
        )
    return configs


def declared_resolution(metadata: Mapping[str, Any]) -> int | None:
    """The training resolution an SD 1.x single file declares in its header's ``metadata``
    (:func:`header_metadata`; ``modelspec.resolution``, e.g. 64 for the demo model), or None: no such entry, or not
    square SD 1.x."""
    if not str(metadata.get("modelspec.architecture", "")).startswith("stable-diffusion-v1"):
        return None
    width, _, height = str(metadata.get("modelspec.resolution", "")).partition("x")
    return int(width) if width.isdigit() and width == height else None


def header_metadata(path: Path) -> dict:
    """The ``__metadata__`` of a safetensors file's header, read without loading a tensor; empty for anything
    else (another format, an unreadable or malformed file)."""
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return {}
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 0 < size <= 100_000_000:
                return {}
            metadata = json.loads(handle.read(size)).get("__metadata__") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return metadata if isinstance(metadata, dict) else {}


def read_config_folder(folder: Path) -> dict[str, dict]:
    """The JSON of a diffusers config folder's ``CONFIG_FILES``; a file it lacks is taken from SD 1.x's folder
    (diffusers folders often have no ``model_index.json``)."""
    configs = {}
    for name in CONFIG_FILES:
        file = folder / name
        if not file.is_file():
            file = CONFIGS_DIR / "sd1" / name
        configs[name] = json.loads(file.read_text(encoding="utf-8"))
    return configs


def write_config_folder(configs: Mapping[str, dict], folder: Path) -> Path:
    """Write ``configs`` (``CONFIG_FILES`` → JSON) as a diffusers config folder; ``model_index.json`` last."""
    for name in sorted(CONFIG_FILES, key=lambda n: n == "model_index.json"):
        file = folder / name
        file.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(configs[name], indent=2, sort_keys=True)
        write_atomic(file, lambda p, text=text: p.write_text(text, encoding="utf-8"))
    return folder


def is_stock_config(configs: Mapping[str, dict], family: str) -> bool:
    """Whether ``configs`` build the same models and noise schedule as the family's shipped config folder.

    The UNet and VAE are compared with their classes' defaults filled in (but the VAE's ``sample_size``, which
    only sets tiling), the text encoder by its shape, the scheduler by its training schedule; names, versions
    and dtypes do not count.
    """
    stock_folder = CONFIGS_DIR / family
    if not (stock_folder / "model_index.json").is_file():
        return False
    return _architecture(configs) == _architecture(read_config_folder(stock_folder))


def _unless_stock(configs: dict[str, dict], family: str) -> dict[str, dict] | None:
    return None if is_stock_config(configs, family) else configs


def _architecture(configs: Mapping[str, dict]) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    text = CLIPTextConfig.from_dict(dict(configs["text_encoder/config.json"])).to_dict()
    schedule_defaults = _with_defaults(DDPMScheduler, {})
    scheduler = configs["scheduler/scheduler_config.json"]
    vae = _with_defaults(AutoencoderKL, configs["vae/config.json"])
    vae.pop("sample_size", None)
    return {
        "unet": _with_defaults(UNet2DConditionModel, configs["unet/config.json"]),
        "vae": vae,
        "text_encoder": {k: text.get(k) for k in TEXT_ENCODER_SHAPE_KEYS},
        "scheduler": {k: scheduler.get(k, schedule_defaults[k]) for k in SCHEDULE_KEYS},
    }


def _with_defaults(cls: type, config: Mapping) -> dict:
    """The config a diffusers class registers when built from ``config``: its __init__ defaults, overridden."""
    parameters = inspect.signature(cls.__init__).parameters
    full = {k: p.default for k, p in parameters.items() if p.default is not inspect.Parameter.empty}
    full.update({k: v for k, v in config.items() if k in parameters})
    return json.loads(json.dumps(full, default=str))


WORKING_FORMAT = 2
"""How ``working/`` is written; a copy stamped with another (or none: 1, all fp32) is rebuilt from the source once.
2: each part in the precision the source stores it in."""


def _save_working(loaded: LoadedModel, working_dir: Path) -> None:
    """Write the diffusers copy, then the stamp last, so a half-written copy is never reused."""
    (working_dir / "source.json").unlink(missing_ok=True)
    for name in ("unet", "vae", "text_encoder", "scheduler", "tokenizer"):
        shutil.rmtree(working_dir / name, ignore_errors=True)
    working_dir.mkdir(parents=True, exist_ok=True)
    c = loaded.components
    for model, name in ((c.unet, "unet"), (c.vae, "vae"), (c.text_encoder, "text_encoder")):
        # exact: the weights came from tensors of this precision (SD 1.x models' only buffer is the text
        # encoder's int64 position_ids, which .to() leaves alone)
        model.to(loaded.stored_dtypes.get(name, torch.float32))
        model.save_pretrained(str(working_dir / name))
    c.scheduler.save_pretrained(str(working_dir / "scheduler"))
    c.tokenizer.save_pretrained(str(working_dir / "tokenizer"))
    if loaded.extra_tensors:
        _save_safetensors(loaded.extra_tensors, working_dir / "extra_tensors.safetensors")
    stamp = json.dumps({"source_id": loaded.source_id, "family": loaded.family,
                        "diffusers_config": loaded.diffusers_config, "working_format": WORKING_FORMAT})
    write_atomic(working_dir / "source.json", lambda p: p.write_text(stamp))


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, str(p)))
