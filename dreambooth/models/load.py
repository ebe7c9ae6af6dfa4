"""Load the source model into diffusers components, offline.

A single file goes through diffusers' own single-file loader, handed a local config folder (the family's,
shipped in ``models/configs/``, or the one the config names) so it never asks the hub. The components are
kept in the model folder's ``working/`` (diffusers layout) and reused by the next run of the same source.
Tensors of the source that are not weights of the three models (the noise schedule's buffers) are kept too,
so that an export carries every tensor of the original file.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelFormatError
from ..fileio import write_atomic
from .components import Components
from .read import SINGLE_FILE_SUFFIXES, detect_family, fingerprint, read_keys, read_tensors
from .tokenizer import find_tokenizer_dir, load_clip_tokenizer

CONFIGS_DIR = Path(__file__).parent / "configs"
DROPPED_PREFIXES = ("model_ema.",)
"""Keys never carried over: the EMA copy of the untrained UNet would shadow the trained weights in loaders that
prefer EMA weights, and it doubles the file."""
MODEL_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")


@dataclass
class LoadedModel:
    """The components to train, plus what the export needs to rebuild the original file."""

    components: Components
    family: str
    source_id: str
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)


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
    if stamp.is_file() and json.loads(stamp.read_text()).get("source_id") == source_id:
        loaded = _load_diffusers_folder(working_dir, cache_dir, tokenizer_dir)
        extra_path = working_dir / "extra_tensors.safetensors"
        if extra_path.is_file():
            from safetensors.torch import load_file

            loaded.extra_tensors = load_file(str(extra_path))
        loaded.source_id = source_id
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
    for model in (loaded.components.unet, loaded.components.vae, loaded.components.text_encoder):
        model.to(torch.float32)  # fp16 files still train with fp32 master weights
    _save_working(loaded, working_dir)
    return loaded


def _load_single_file(path: Path, cache_dir: Path, tokenizer_dir: str, config_dir: str) -> LoadedModel:
    family = detect_family(read_keys(path), path)
    config_folder = Path(config_dir) if config_dir else CONFIGS_DIR / family
    if not (config_folder / "model_index.json").is_file():
        raise ModelFormatError(
            f"Model config folder {config_folder} has no model_index.json.",
            "Point 'model_config_dir' at a diffusers config folder, or leave it empty.",
        )
    tokenizer = load_clip_tokenizer(find_tokenizer_dir(tokenizer_dir, cache_dir / "clip-tokenizer"))
    tensors = read_tensors(path)
    extra = {k: v for k, v in tensors.items() if not k.startswith(MODEL_PREFIXES + DROPPED_PREFIXES)}
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
    return LoadedModel(components=components, family=family, source_id="", extra_tensors=extra)


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
    return LoadedModel(components=components, family="sd1", source_id="")


def _save_working(loaded: LoadedModel, working_dir: Path) -> None:
    """Write the diffusers copy, then the stamp last, so a half-written copy is never reused."""
    (working_dir / "source.json").unlink(missing_ok=True)
    for name in ("unet", "vae", "text_encoder", "scheduler", "tokenizer"):
        shutil.rmtree(working_dir / name, ignore_errors=True)
    working_dir.mkdir(parents=True, exist_ok=True)
    c = loaded.components
    c.unet.save_pretrained(str(working_dir / "unet"))
    c.vae.save_pretrained(str(working_dir / "vae"))
    c.text_encoder.save_pretrained(str(working_dir / "text_encoder"))
    c.scheduler.save_pretrained(str(working_dir / "scheduler"))
    c.tokenizer.save_pretrained(str(working_dir / "tokenizer"))
    if loaded.extra_tensors:
        _save_safetensors(loaded.extra_tensors, working_dir / "extra_tensors.safetensors")
    stamp = json.dumps({"source_id": loaded.source_id, "family": loaded.family})
    write_atomic(working_dir / "source.json", lambda p: p.write_text(stamp))


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, str(p)))
