"""The ``.yaml`` that lets the AUTOMATIC1111 web UI build an SD 1.x model of non-stock shape (the demo model), and
the text encoder description it names.

The web UI builds SD 1.x models from an LDM config. A yaml beside a checkpoint (same name) wins over its
guess. The stock text encoder class, ``ldm.modules.encoders.modules.FrozenCLIPEmbedder``, takes its shape and
its tokenizer from ``params.version`` (``CLIPTextModel.from_pretrained(version)``, which the web UI redirects to
"config only, weights from the checkpoint", and ``CLIPTokenizer.from_pretrained(version)``). A hub name cannot
describe our 64-wide encoder; a folder can, but the web UI hands ``version`` to transformers unchanged
(``modules/sd_models.py`` ``load_model``: ``OmegaConf.load`` then ``instantiate_from_config``; ``repair_config``
rewrites no path but one of its own), so a relative path is resolved against the web UI's working folder, never the
yaml's, and an absolute one breaks when the models folder moves. So ``version`` names no folder at all: it is a
model name, ``dreambooth-local/text-encoder-<content hash>``, whose files (the text encoder's ``config.json``,
the CLIP tokenizer's ``vocab.json``/``merges.txt`` and every optional file the tokenizer asks for) are placed in
the Hugging Face cache of this machine, where transformers finds them offline. The web UI's loader asks that
cache first, with ``local_files_only=True`` (``modules/sd_disable_initialization.py``), and goes to the network
only for a file it lacks, so every file it asks for is there. Moving, renaming or re-mounting the models folder
changes nothing; one entry serves every checkpoint of the same text encoder. On another machine (another cache),
``python -m dreambooth yaml <checkpoint>`` writes the entry again.

The engine writes a yaml beside every checkpoint of a model whose configs are not SD 1.x's stock ones (the demo
model and what is trained from it), from the configs the checkpoint carries; :func:`write_host_yaml` takes them as
a config folder or as that mapping (``models.load.CONFIG_FILES`` → JSON).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

from ..fileio import write_atomic
from .config_folder import read_config_folder
from .tokenizer import TOKENIZER_FILES, find_tokenizer_dir

TEXT_ENCODER_NAMESPACE = "dreambooth-local"
"""The owner part of the model names the yamls give their text encoders (no such owner exists on the hub)."""

HUB_REVISION = "main"

YAML_TEMPLATE = """\
# LDM config of the DreamBooth demo model (tiny SD 1.x, 64x64 pixels); written by dreambooth.models.host_yaml.
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: {latent_size}
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: {scale_factor}
    use_ema: False{parameterization}
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: {latent_size}
        in_channels: 4
        out_channels: 4
        model_channels: {model_channels}
        attention_resolutions: {attention_resolutions}
        num_res_blocks: {num_res_blocks}
        channel_mult: {channel_mult}
        num_heads: {num_heads}
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: {context_dim}
        use_checkpoint: False
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: {resolution}
          in_channels: 3
          out_ch: 3
          ch: {vae_ch}
          ch_mult: {vae_ch_mult}
          num_res_blocks: {vae_res_blocks}
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
      params:
        version: "{text_encoder}"
"""


Configs = Mapping[str, dict]
"""A config folder as data: ``"unet/config.json"`` → its JSON, and so on (``models.load.CONFIG_FILES``)."""


def ldm_yaml(config_dir: Path | Configs, text_encoder: str) -> str:
    """The LDM config text for the model whose diffusers configs are ``config_dir`` (a folder, or its JSON); its
    text encoder is the model name (or folder) ``text_encoder``."""
    configs = _configs(config_dir)
    unet = configs["unet/config.json"]
    vae = configs["vae/config.json"]
    scheduler = configs.get("scheduler/scheduler_config.json", {})
    channels = unet["block_out_channels"]
    heads = unet["attention_head_dim"]
    attention = [2**i for i, kind in enumerate(unet["down_block_types"]) if kind.startswith("CrossAttn")]
    vae_channels = vae["block_out_channels"]
    v_prediction = scheduler.get("prediction_type") == "v_prediction"
    return YAML_TEMPLATE.format(
        latent_size=unet["sample_size"],
        scale_factor=vae["scaling_factor"],
        model_channels=channels[0],
        attention_resolutions=attention,
        num_res_blocks=unet["layers_per_block"],
        channel_mult=[c // channels[0] for c in channels],
        num_heads=heads if isinstance(heads, int) else heads[0],
        context_dim=unet["cross_attention_dim"],
        resolution=vae["sample_size"],
        vae_ch=vae_channels[0],
        vae_ch_mult=[c // vae_channels[0] for c in vae_channels],
        vae_res_blocks=vae["layers_per_block"],
        text_encoder=text_encoder,
        parameterization='\n    parameterization: "v"' if v_prediction else "",
    )


WEB_UI_NORM_GROUPS = 32
"""The group count of every GroupNorm in the web UI's LDM code (``GroupNorm32``, ``Normalize``): not in the yaml."""


def web_ui_cannot_build(config_dir: Path | Configs) -> list[str]:
    """What in these configs the web UI's SD 1.x code (the LDM classes a yaml names) has no setting for; empty when
    :func:`ldm_yaml` describes the model exactly. A yaml written anyway would fail inside the web UI's loader."""
    configs = _configs(config_dir)
    unet, vae = configs["unet/config.json"], configs["vae/config.json"]
    problems = [
        f"its {part} normalises in {groups} groups (the web UI's code always uses {WEB_UI_NORM_GROUPS})"
        for part, groups in (("UNet", unet.get("norm_num_groups", 32)), ("VAE", vae.get("norm_num_groups", 32)))
        if groups != WEB_UI_NORM_GROUPS
    ]
    heads = unet.get("attention_head_dim", 8)
    if isinstance(heads, (list, tuple)) and len(set(heads)) > 1:
        problems.append(f"its attention head counts differ by block ({list(heads)}; the yaml has one count)")
    depth = unet.get("transformer_layers_per_block", 1)
    if any(d != 1 for d in (depth if isinstance(depth, (list, tuple)) else [depth])):
        problems.append(f"it stacks {depth} transformer layers per block (SD 1.x: 1)")
    if unet.get("use_linear_projection"):
        problems.append("its transformers project linearly (SD 2.x style; the SD 1.x yaml projects by convolution)")
    for part, value in (("UNet's layers per block", unet.get("layers_per_block", 2)),
                        ("VAE's layers per block", vae.get("layers_per_block", 2))):
        if isinstance(value, (list, tuple)):
            problems.append(f"its {part} differ by block ({list(value)}; the yaml has one count)")
    for part, channels in (("UNet", unet["block_out_channels"]), ("VAE", vae["block_out_channels"])):
        if any(c % channels[0] for c in channels):
            problems.append(f"its {part} widths {list(channels)} are not multiples of the first")
    latent = {unet.get("in_channels", 4), unet.get("out_channels", 4), vae.get("latent_channels", 4)}
    if latent != {4}:
        problems.append(f"its latents have {sorted(latent)} channels (the yaml's SD 1.x: 4)")
    return problems


def write_host_yaml(checkpoint: Path, config_dir: Path | Configs, cache_dir: Path | None = None,
                    tokenizer_dir: str = "") -> Path:
    """Write ``<checkpoint>.yaml`` for the web UI, first placing its text encoder's files in the Hugging Face cache
    ``cache_dir`` (default: the one transformers uses here, :func:`hub_cache`).

    The cache entry is complete before the yaml exists, and every file appears whole (written atomically, and only
    when its content changes), so a web UI reading them while a later checkpoint is saved never sees half a file.
    """
    files = text_encoder_files(_configs(config_dir), tokenizer_dir)
    name = publish_text_encoder(files, cache_dir)
    text = ldm_yaml(config_dir, name)
    return write_atomic(checkpoint.with_suffix(".yaml"), lambda p: p.write_text(text, encoding="utf-8"))


def text_encoder_files(configs: Configs, tokenizer_dir: str = "") -> dict[str, bytes]:
    """The files transformers reads for ``CLIPTextModel``'s config and ``CLIPTokenizer``: file name → bytes."""
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    with tempfile.TemporaryDirectory() as scratch:  # where open_clip's vocabulary is rebuilt when nothing else has it
        tokenizer = find_tokenizer_dir(tokenizer_dir or None, Path(scratch))
        vocabulary = {name: (tokenizer / name).read_bytes() for name in TOKENIZER_FILES}
    return {
        "config.json": json.dumps(configs["text_encoder/config.json"], indent=2, sort_keys=True).encode(),
        **vocabulary,
        "special_tokens_map.json": json.dumps(special, sort_keys=True).encode(),
        "tokenizer_config.json": json.dumps({**special, "model_max_length": 77}, sort_keys=True).encode(),
        "added_tokens.json": b"{}",
    }


def publish_text_encoder(files: Mapping[str, bytes], cache_dir: Path | None = None) -> str:
    """Place ``files`` in the Hugging Face cache as the snapshot of a model named by their content; returns the name.

    The layout is the hub cache's own (``models--<owner>--<name>/refs/main`` holding a commit id, the files under
    ``snapshots/<commit>/``), so ``from_pretrained(name)`` finds them offline and ``local_files_only=True`` does too.
    """
    digest = hashlib.sha256()
    for file_name in sorted(files):
        digest.update(file_name.encode() + b"\0" + hashlib.sha256(files[file_name]).digest())
    commit = digest.hexdigest()[:40]
    name = f"{TEXT_ENCODER_NAMESPACE}/text-encoder-{commit[:16]}"
    root = Path(cache_dir) if cache_dir is not None else hub_cache()
    entry = root / ("models--" + name.replace("/", "--"))
    snapshot = entry / "snapshots" / commit
    for file_name, data in files.items():
        _write_if_changed(snapshot / file_name, data)
    _write_if_changed(entry / "refs" / HUB_REVISION, commit.encode())
    return name


def hub_cache() -> Path:
    """The Hugging Face cache folder the installed transformers reads, found from the environment at call time as
    it finds it: transformers 4.x (the web UI's 4.30) reads ``TRANSFORMERS_CACHE`` first and ignores
    ``HF_HUB_CACHE``; transformers 5 leaves it to huggingface-hub, which reads ``HF_HUB_CACHE`` first."""
    order = CACHE_VARIABLES_4 if _transformers_major() < 5 else CACHE_VARIABLES_5
    for variable in order:
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(Path.home(), ".cache")), "huggingface"
    )
    return Path(home).expanduser() / "hub"


CACHE_VARIABLES_4 = ("TRANSFORMERS_CACHE", "HUGGINGFACE_HUB_CACHE", "PYTORCH_TRANSFORMERS_CACHE",
                     "PYTORCH_PRETRAINED_BERT_CACHE")
"""Where transformers 4.x looks for its cache, in its order, before ``HF_HOME``."""
CACHE_VARIABLES_5 = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")
"""Where huggingface-hub (and so transformers 5) looks, in its order, before ``HF_HOME``."""


def _transformers_major() -> int:
    try:
        return int(metadata.version("transformers").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return 5


def _configs(config_dir: Path | Configs) -> Configs:
    return read_config_folder(Path(config_dir)) if isinstance(config_dir, (str, Path)) else config_dir


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.is_file() and path.read_bytes() == data:
        return
    write_atomic(path, lambda p: p.write_bytes(data))
