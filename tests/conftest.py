"""Shared fixtures: a tiny SD 1.x checkpoint built from a seed, a few subject photos, and a config that uses them."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from tiny_families import build_tiny_sd2, build_tiny_sdxl, write_family_config_folder, write_tiny_single_file
from tiny_model import build_tiny_components, write_config_folder

from dreambooth.config import TrainConfig
from dreambooth.events import Events
from dreambooth.models.export import checkpoint_tensors, save_checkpoint
from dreambooth.models.tokenizer import find_tokenizer_dir, load_clip_tokenizer

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def hub_cache_of_the_tests(tmp_path_factory) -> Path:
    """The Hugging Face cache that yamls for the web UI write to (``models/host_yaml.py``): a temporary folder, so
    the tests never add entries to this machine's own cache (read by this process and every child it starts)."""
    folder = tmp_path_factory.mktemp("hf-cache")
    names = ("TRANSFORMERS_CACHE", "HF_HUB_CACHE")  # the first one each transformers version reads
    previous = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, str(folder)))
    yield folder
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The CLIP tokenizer rebuilt from open_clip's vocabulary (no network)."""
    return find_tokenizer_dir(None, tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tokenizer_dir):
    """A tiny SD 1.x single file in the original layout, its config folder, and the components it came from.

    Besides the three models it carries the noise-schedule buffers and an EMA key, as real checkpoints do.
    """
    folder = tmp_path_factory.mktemp("tiny")
    components = build_tiny_components(load_clip_tokenizer(tokenizer_dir), seed=0)
    config_dir = write_config_folder(components, folder / "config")
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    extra = {
        "betas": betas.float(),
        "alphas_cumprod": torch.cumprod(1 - betas, 0).float(),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(0, dtype=torch.int32),
    }
    path = save_checkpoint(folder / "tiny-sd1.safetensors", checkpoint_tensors(components, extra))
    return dataclasses.make_dataclass("Tiny", ["path", "config_dir", "components", "extra"])(
        path, config_dir, components, extra
    )


def draw_subject(path: Path, seed: int, size: int = 64, colour=(220, 40, 40)) -> Path:
    """A coloured disc on a varied background, a little wider than high: a stand-in photo of a subject."""
    rng = np.random.default_rng(seed)
    background = tuple(int(v) for v in rng.integers(0, 255, 3))
    image = Image.new("RGB", (size + size // 4, size), background)
    r = size // 4 + int(rng.integers(0, size // 8))
    cx, cy = int(rng.integers(r, size + size // 4 - r)), int(rng.integers(r, size - r))
    ImageDraw.Draw(image).ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


@pytest.fixture
def instance_dir(tmp_path) -> Path:
    folder = tmp_path / "instance"
    for i in range(3):
        draw_subject(folder / f"zwx_{i}.png", seed=i)
    return folder


@pytest.fixture
def make_config(tmp_path, tiny, tokenizer_dir, instance_dir):
    """A config for a few fast steps on the tiny model; keyword arguments override any option."""

    def make(concept: dict | None = None, **options) -> TrainConfig:
        concept_fields = {
            "instance_dir": str(instance_dir),
            "instance_prompt": "photo of zwx disc",
            "class_prompt": "photo of a disc",
            "num_class_images": 2,
            "class_infer_steps": 2,
            **(concept or {}),
        }
        fields = {
            "model_name": "zwx",
            "source_checkpoint": str(tiny.path),
            "model_config_dir": str(tiny.config_dir),
            "tokenizer_dir": str(tokenizer_dir),
            "resolution": 64,
            "max_steps": 3,
            "save_every": 0,
            "learning_rate": 1e-3,
            "device": "cpu",
            "save_dtype": "fp32",
            "log_every": 1,
            "concepts": [concept_fields],
            **options,
        }
        return TrainConfig.from_dict(fields)

    return make


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return tmp_path / "models" / "zwx"


@pytest.fixture
def events(model_dir):
    """Events collected in memory (and logged to the model folder)."""
    collected: list[dict] = []
    log = Events(model_dir / "logs" / "events.jsonl", on_event=collected.append)
    log.collected = collected
    yield log
    log.close()


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory, tokenizer_dir):
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    components = build_tiny_sdxl(tokenizer_dir, seed=0)
    config_dir = write_family_config_folder(components, folder / "config", "sdxl")
    path = write_tiny_single_file(components, "sdxl", folder / "tiny-sdxl.safetensors")
    return dataclasses.make_dataclass("Tiny", ["path", "config_dir", "components"])(path, config_dir, components)


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory, tokenizer_dir):
    folder = tmp_path_factory.mktemp("tiny-sd2")
    components = build_tiny_sd2(tokenizer_dir, seed=0, prediction_type="v_prediction")
    config_dir = write_family_config_folder(components, folder / "config", "sd2", text_layers=2)
    path = write_tiny_single_file(
        components, "sd2", folder / "tiny-sd2.safetensors", {"modelspec.prediction_type": "v"}
    )
    return dataclasses.make_dataclass("Tiny", ["path", "config_dir", "components"])(path, config_dir, components)
