"""The exact Stable Diffusion 1.5 architecture with random weights from a seed, saved as a diffusers folder.

Throughput and memory do not depend on the weight values, so a seeded model stands in for the real one on a
machine that has no weights. The configs are the project's own SD 1 family configs (UNet 320/640/1280/1280,
cross-attention 768; CLIP ViT-L text encoder 768 wide, 12 layers; VAE 128/256/512/512). Modules are built
directly on the GPU when there is one (seconds instead of minutes of CPU initialisation).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SD1_CONFIGS = REPO / "dreambooth" / "models" / "configs" / "sd1"


def _config(name: str) -> dict:
    data = json.loads((SD1_CONFIGS / name / "config.json").read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def build_sd15(folder: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Write ``folder`` (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/); returns it."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreambooth.models.tokenizer import load_clip_tokenizer

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    with device:
        unet = UNet2DConditionModel.from_config(_config("unet"))
        vae = AutoencoderKL.from_config(_config("vae"))
        text_encoder = CLIPTextModel(
            CLIPTextConfig(**{k: v for k, v in _config("text_encoder").items() if k != "architectures"})
        )
    scheduler_config = json.loads((SD1_CONFIGS / "scheduler" / "scheduler_config.json").read_text())
    scheduler = DDPMScheduler.from_config({k: v for k, v in scheduler_config.items() if not k.startswith("_")})
    tokenizer = load_clip_tokenizer(Path(tokenizer_dir))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to("cpu")
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def parameter_counts(folder: Path) -> dict[str, int]:
    """Weights per component of a saved folder (a check that the architecture is SD 1.5's: UNet 859.5 M)."""
    from safetensors import safe_open

    counts = {}
    for part in ("unet", "vae", "text_encoder"):
        total = 0
        for file in sorted((Path(folder) / part).glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    n = 1
                    for size in f.get_slice(key).get_shape():
                        n *= size
                    total += n
        counts[part] = total
    return counts
