"""Load the source model into diffusers components, offline.

A single file goes through diffusers' own single-file loader, handed a local config folder (the family's,
shipped in ``models/configs/``, or the one the config names) so it never asks the hub. Each run reads the source
itself: loading a single file is as fast as loading a diffusers copy of it (SD 1.5 on 2 CPU cores: 11 s either
way), so no copy is kept (it cost 2-7 GB a model and half a minute on the first run). Tensors of the source
that are not weights of the models (the noise schedule's buffers) are kept too,
so that an export carries every tensor of the original file.

A model whose configs are not the family's stock ones (a tiny or otherwise re-shaped model) carries its config
folder inside the file: the safetensors header key ``dreambooth.diffusers_config`` (``export.CONFIG_METADATA_KEY``)
holds the JSON of ``model_index.json`` and the unet/vae/text_encoder/scheduler configs. With no
``model_config_dir``, such a file is loaded through a config folder rebuilt from that key in the cache folder.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelFormatError
from ..fileio import write_atomic
from .components import Components
from .config_folder import read_config_folder, write_config_folder  # noqa: F401 -- load.read_config_folder stays
from .export import CONFIG_METADATA_KEY
from .families import ModelFamily, family_named, identify_folder, identify_single_file
from .families.base import COMMON_CONFIG_FILES, CONFIGS_DIR
from .read import SINGLE_FILE_SUFFIXES, fingerprint, read_shapes, read_tensors
from .tokenizer import find_tokenizer_dir, load_clip_tokenizer

DROPPED_PREFIXES = ("model_ema.",)
"""Keys never carried over: the EMA copy of the untrained UNet would shadow the trained weights in loaders that
prefer EMA weights, and it doubles the file."""
CONFIG_FILES = COMMON_CONFIG_FILES
"""The files every family's diffusers config folder has (SDXL adds ``text_encoder_2/config.json``)."""
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
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class LoadedModel:
    """The components to train, plus what the export needs to rebuild the original file."""

    components: Components
    family: ModelFamily
    source_id: str
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    """Tensors of the source that the export does not write from the components (noise-schedule buffers, SD 2.x's
    unused last text layer and projection, OpenCLIP's logit scale): written back unchanged."""
    diffusers_config: dict[str, dict] | None = None
    """The config folder's files (``config_files`` → JSON) when they differ from the family's stock folders:
    exports carry them in their header, and the web UI needs a ``.yaml`` for them. None for a stock model."""

    def __post_init__(self) -> None:
        if isinstance(self.family, str):  # a family given by its name
            self.family = family_named(self.family)


def load_model(
    source: str | Path,
    *,
    cache_dir: Path,
    tokenizer_dir: str = "",
    config_dir: str = "",
    prediction_type: str = "auto",
) -> LoadedModel:
    """Load ``source`` (single file or diffusers folder) with fp32 weights; ``cache_dir`` holds what is rebuilt
    from it (the CLIP tokenizer, a config folder its header carries, a ``.ckpt``'s safetensors copy while it loads).
    ``prediction_type`` ('epsilon', 'v_prediction') overrides what the source declares or its family detects."""
    source = Path(source)
    if not source.exists():
        raise ModelFormatError(
            f"Source checkpoint {source} does not exist.",
            "Pick a checkpoint the web UI lists, or give the full path to one.",
        )
    if source.is_dir():
        loaded = _load_diffusers_folder(source, cache_dir, tokenizer_dir)
        if prediction_type in PREDICTION_TYPES:
            _set_prediction(loaded, prediction_type, stock=loaded.diffusers_config is None)
    elif source.suffix.lower() in SINGLE_FILE_SUFFIXES:
        loaded = _load_single_file(source, cache_dir, tokenizer_dir, config_dir, prediction_type)
    else:
        raise ModelFormatError(
            f"{source} is neither a checkpoint file ({', '.join(SINGLE_FILE_SUFFIXES)}) nor a diffusers folder.",
            "Pick a .safetensors or .ckpt file.",
        )
    loaded.source_id = fingerprint(source)
    _to_fp32(loaded)
    return loaded


def _to_fp32(loaded: LoadedModel) -> None:
    """fp16 files still train with fp32 master weights (widening is exact)."""
    for model in loaded.components.models.values():
        model.to(torch.float32)


def _load_single_file(
    path: Path, cache_dir: Path, tokenizer_dir: str, config_dir: str, prediction_type: str = "auto"
) -> LoadedModel:
    shapes = read_shapes(path)
    family = identify_single_file(shapes, path)
    declared = prediction_type if prediction_type in PREDICTION_TYPES else None
    declared = declared or family.declared_prediction(shapes, header_metadata(path))
    stock = not config_dir
    if config_dir:
        config_folder = Path(config_dir)
    else:
        embedded = embedded_config(path)
        config_folder = family.stock_config_folder(declared)
        if embedded is not None:
            config_folder = write_config_folder(embedded, cache_dir / EMBEDDED_CONFIG_DIR)
            stock = False
    if not (config_folder / "model_index.json").is_file():
        raise ModelFormatError(
            f"Model config folder {config_folder} has no model_index.json.",
            "Point 'model_config_dir' at a diffusers config folder, or leave it empty.",
        )
    tokenizers = _tokenizers(family, tokenizer_dir, cache_dir)
    tensors = read_tensors(path)
    model_prefixes = tuple(family.single_file_prefixes.values())
    readable = path
    if path.suffix.lower() != ".safetensors":
        readable = cache_dir / f"{path.stem}.converting.safetensors"
        _save_safetensors({k: v for k, v in tensors.items() if k.startswith(model_prefixes)}, readable)
    try:
        components = _from_single_file(readable, config_folder, tokenizers, family)
    except ModelFormatError:
        raise
    except Exception as exc:  # diffusers' loader raises many types for a file of the wrong shape
        raise ModelFormatError(
            f"{path} could not be loaded as {family.label} with the configs in {config_folder} "
            f"({type(exc).__name__}: {exc}).",
            "If it is a model of an unusual shape, set 'model_config_dir' to its diffusers config folder.",
        ) from None
    finally:
        if readable != path:
            readable.unlink(missing_ok=True)
    exported = family.export_tensors(components).keys()
    extra = {k: v for k, v in tensors.items() if k not in exported and not k.startswith(DROPPED_PREFIXES)}
    del tensors
    configs = read_config_folder(config_folder, family)
    loaded = LoadedModel(
        components=components,
        family=family,
        source_id="",
        extra_tensors=extra,
        diffusers_config=_unless_stock(configs, family),
    )
    prediction = declared or (family.detect_prediction(components) if stock else components.prediction_type)
    _set_prediction(loaded, prediction, stock=stock and loaded.diffusers_config is None)
    return loaded


def _set_prediction(loaded: LoadedModel, prediction_type: str, stock: bool) -> None:
    """Make the scheduler predict ``prediction_type``; the configs follow (a stock model takes the stock folder of
    that prediction when its family ships one, else its configs are no longer stock)."""
    from diffusers import DDPMScheduler

    components, family = loaded.components, loaded.family
    if components.prediction_type == prediction_type:
        return
    components.scheduler = DDPMScheduler.from_config(components.scheduler.config, prediction_type=prediction_type)
    if stock and prediction_type in family.stock_predictions:
        loaded.diffusers_config = None
        return
    configs = dict(loaded.diffusers_config or read_config_folder(family.stock_config_folder(), family))
    configs["scheduler/scheduler_config.json"] = {
        **configs["scheduler/scheduler_config.json"], "prediction_type": prediction_type
    }
    loaded.diffusers_config = _unless_stock(configs, family)


def _tokenizers(family: ModelFamily, tokenizer_dir: str, cache_dir: Path) -> dict[str, Any]:
    """Each of the family's tokenizers, all from the one CLIP vocabulary, with the family's padding tokens."""
    folder = find_tokenizer_dir(tokenizer_dir, cache_dir / "clip-tokenizer")
    return {name: load_clip_tokenizer(folder, pad) for name, pad in family.pad_tokens.items()}


def _from_single_file(
    path: Path, config_folder: Path, tokenizers: Mapping[str, Any], family: ModelFamily
) -> Components:
    import diffusers
    from diffusers import DDPMScheduler

    pipe = getattr(diffusers, family.pipeline_class).from_single_file(
        str(path), config=str(config_folder), local_files_only=True, **tokenizers, **family.pipeline_extras()
    )
    return Components(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=tokenizers["tokenizer"],
        scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        text_encoder_2=getattr(pipe, "text_encoder_2", None),
        tokenizer_2=tokenizers.get("tokenizer_2"),
    )


def _read_json(file: Path) -> dict:
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}


def _load_diffusers_folder(
    folder: Path, cache_dir: Path, tokenizer_dir: str, family: ModelFamily | None = None
) -> LoadedModel:
    import transformers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    if family is None:
        family = identify_folder(
            folder,
            _read_json(folder / "model_index.json"),
            _read_json(folder / "text_encoder" / "config.json"),
            _read_json(folder / "unet" / "config.json"),
        )
    parts = ("unet", "vae", *family.text_encoder_names, "scheduler")
    missing = [name for name in parts if not (folder / name).is_dir()]
    if missing:
        raise ModelFormatError(
            f"{folder} is not a diffusers {family.label} folder (no {', '.join(missing)}).",
            "Pick the folder that holds model_index.json, or a single .safetensors file.",
        )
    found = find_tokenizer_dir(tokenizer_dir, cache_dir / "clip-tokenizer") if tokenizer_dir else None
    tokenizers = {}
    for name, pad in family.pad_tokens.items():
        own = folder / name
        tokenizers[name] = load_clip_tokenizer(
            own if found is None and (own / "vocab.json").is_file()
            else found or find_tokenizer_dir("", cache_dir / "clip-tokenizer"),
            pad,
        )
    encoders = {
        name: getattr(transformers, family.text_encoder_classes[name]).from_pretrained(
            str(folder), subfolder=name, local_files_only=True
        )
        for name in family.text_encoder_names
    }
    components = Components(
        unet=UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", local_files_only=True),
        vae=AutoencoderKL.from_pretrained(str(folder), subfolder="vae", local_files_only=True),
        scheduler=DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler", local_files_only=True),
        **encoders,
        **tokenizers,
    )
    widths = sum(model.config.hidden_size for model in components.text_encoders.values())
    if components.unet.config.cross_attention_dim != widths:
        raise ModelFormatError(
            f"{folder}: the UNet's cross-attention width ({components.unet.config.cross_attention_dim}) does not "
            f"match the text encoders' ({widths}).",
            f"This is not a {family.label} model we can train.",
        )
    return LoadedModel(
        components=components,
        family=family,
        source_id="",
        diffusers_config=_unless_stock(read_config_folder(folder, family), family),
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
    """The square training resolution a single file declares in its header's ``metadata``
    (:func:`header_metadata`; ``modelspec.resolution``, e.g. 64 for the demo model), or None."""
    width, _, height = str(metadata.get("modelspec.resolution", "")).partition("x")
    return int(width) if width.isdigit() and width == height else None


def native_resolution(source: Path) -> int | None:
    """The side a source model was trained at: what its header declares, else its family's released size (512,
    768 for SD 2.x v-prediction, 1024 for SDXL); None when the source cannot be identified."""
    try:
        return describe_source(source).native_resolution
    except ModelFormatError:
        return None


@dataclass(frozen=True)
class SourceSummary:
    """What the tab and the API say of a source before anything is loaded: read from headers and configs only."""

    family: str
    """The family's label, e.g. 'SDXL'."""
    parts: tuple[str, ...]
    """The model parts it has (``Components`` attributes): what options that ``require`` one apply to."""
    prediction_type: str
    """What it declares (or its family's usual one; SD 2.x's test on the weights runs only when it loads)."""
    native_resolution: int


def describe_source(source: Path) -> SourceSummary:
    """Identify a single file from its header or a diffusers folder from its configs; ``ModelFormatError`` (with
    what it is and what to pick instead) for what no family trains."""
    source = Path(source)
    if source.is_dir():
        family = identify_folder(source, _read_json(source / "model_index.json"),
                                 _read_json(source / "text_encoder" / "config.json"),
                                 _read_json(source / "unet" / "config.json"))
        prediction = _read_json(source / "scheduler" / "scheduler_config.json").get("prediction_type", "epsilon")
        resolution = family.native_resolution(prediction)
    elif source.is_file():
        shapes = read_shapes(source)
        family = identify_single_file(shapes, source)
        metadata = header_metadata(source)
        prediction = family.declared_prediction(shapes, metadata) or family.default_prediction
        resolution = declared_resolution(metadata) or family.native_resolution(prediction)
    else:
        raise ModelFormatError(f"Source checkpoint {source} does not exist.",
                               "Pick a checkpoint the web UI lists, or give the full path to one.")
    parts = ("unet", "vae", *family.text_encoder_names)
    return SourceSummary(family.label, parts, prediction, resolution)


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


def is_stock_config(configs: Mapping[str, dict], family: ModelFamily | str) -> bool:
    """Whether ``configs`` build the same models and noise schedule as one of the family's shipped config folders.

    The UNet and VAE are compared with their classes' defaults filled in (but their ``sample_size``, which only
    sets the default image size and tiling), the text encoders by their shape, the scheduler by its training
    schedule; names, versions and dtypes do not count.
    """
    family = family_named(family) if isinstance(family, str) else family
    mine = _architecture(configs)
    return any(
        mine == _architecture(read_config_folder(CONFIGS_DIR / folder, family))
        for folder in family.stock_predictions.values()
    )


def _unless_stock(configs: dict[str, dict], family: ModelFamily) -> dict[str, dict] | None:
    return None if is_stock_config(configs, family) else configs


def _architecture(configs: Mapping[str, dict]) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    schedule_defaults = _with_defaults(DDPMScheduler, {})
    scheduler = configs["scheduler/scheduler_config.json"]
    unet = _with_defaults(UNet2DConditionModel, configs["unet/config.json"])
    vae = _with_defaults(AutoencoderKL, configs["vae/config.json"])
    unet.pop("sample_size", None)
    vae.pop("sample_size", None)
    encoders = {}
    for name in sorted(n for n in configs if n.startswith("text_encoder")):
        text = CLIPTextConfig.from_dict(dict(configs[name])).to_dict()
        encoders[name] = {k: text.get(k) for k in TEXT_ENCODER_SHAPE_KEYS}
    return {
        "unet": unet,
        "vae": vae,
        "text_encoders": encoders,
        "scheduler": {k: scheduler.get(k, schedule_defaults[k]) for k in SCHEDULE_KEYS},
    }


def _with_defaults(cls: type, config: Mapping) -> dict:
    """The config a diffusers class registers when built from ``config``: its __init__ defaults, overridden."""
    parameters = inspect.signature(cls.__init__).parameters
    full = {k: p.default for k, p in parameters.items() if p.default is not inspect.Parameter.empty}
    full.update({k: v for k, v in config.items() if k in parameters})
    return json.loads(json.dumps(full, default=str))



def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, str(p)))
