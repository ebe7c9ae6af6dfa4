"""SD 2.x and SDXL end to end on tiny models: single file in, train a few steps, export, and diffusers' own
single-file loader reads back exactly the trained tensors; resume is bitwise; conditioning is the family's."""

from __future__ import annotations

import dataclasses
import pytest
import torch
from safetensors import safe_open

from dreambooth.config import TrainConfig
from dreambooth.engine import run
from dreambooth.models.components import Components
from dreambooth.models.families import family_named
from dreambooth.models.read import read_tensors
from tiny_families import build_tiny_sd2, build_tiny_sdxl, write_family_config_folder, write_tiny_single_file


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
    path = write_tiny_single_file(components, "sd2", folder / "tiny-sd2.safetensors", {"modelspec.prediction_type": "v"})
    return dataclasses.make_dataclass("Tiny", ["path", "config_dir", "components"])(path, config_dir, components)


def _config(tiny, tokenizer_dir, instance_dir, **options) -> TrainConfig:
    return TrainConfig.from_dict({
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
        "concepts": [{"instance_dir": str(instance_dir), "instance_prompt": "photo of zwx disc",
                      "class_prompt": "photo of a disc", "num_class_images": 2, "class_infer_steps": 2}],
        **options,
    })


def _diffusers_reads(path, config_dir, family: str, tokenizer_dir):
    import diffusers

    from dreambooth.models.tokenizer import load_clip_tokenizer

    fam = family_named(family)
    tokenizers = {name: load_clip_tokenizer(tokenizer_dir, pad) for name, pad in fam.pad_tokens.items()}
    return getattr(diffusers, fam.pipeline_class).from_single_file(
        str(path), config=str(config_dir), local_files_only=True, **tokenizers, **fam.pipeline_extras()
    )


@pytest.mark.parametrize("family", ["sdxl", "sd2"])
def test_train_export_and_diffusers_reads_back_the_trained_tensors(
    family, tiny_sdxl, tiny_sd2, tokenizer_dir, instance_dir, tmp_path, events
):
    tiny = {"sdxl": tiny_sdxl, "sd2": tiny_sd2}[family]
    config = _config(tiny, tokenizer_dir, instance_dir, train_text_encoder=True, train_text_encoder_2=True)
    result = run(config, tmp_path / "zwx", events)
    assert not result.cancelled and len(result.checkpoints) == 1
    assert all(torch.isfinite(torch.tensor(loss)) for loss in result.losses)
    before, after = read_tensors(tiny.path), read_tensors(result.checkpoints[0])
    # training moved the UNet and every text encoder
    moved = {k for k in before if not torch.equal(before[k].float(), after[k].float())}
    prefixes = {"sdxl": ("model.diffusion_model.", "conditioner.embedders.0.", "conditioner.embedders.1."),
                "sd2": ("model.diffusion_model.", "cond_stage_model.model.")}[family]
    assert all(any(k.startswith(p) for k in moved) for p in prefixes)
    assert not any(k.startswith("first_stage_model.") for k in moved)
    # every tensor of the source is in the export, with its shape; what diffusers' own loader reads from the export,
    # written again by our exporter, is the export itself: diffusers read exactly the tensors we trained
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    pipe = _diffusers_reads(result.checkpoints[0], tiny.config_dir, family, tokenizer_dir)
    fam = family_named(family)
    components = Components(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=None,
                            scheduler=pipe.scheduler, text_encoder_2=getattr(pipe, "text_encoder_2", None))
    reread = fam.export_tensors(components)
    assert reread.keys() <= after.keys()
    for key, value in reread.items():
        assert torch.equal(value.float(), after[key].float()), key
    header = safe_open(str(result.checkpoints[0]), framework="pt").metadata()
    expected = {"sdxl": "stable-diffusion-xl-v1-base", "sd2": "stable-diffusion-v2-768-v"}[family]
    assert header["modelspec.architecture"] == expected
    assert not result.checkpoints[0].with_suffix(".yaml").exists()
    warnings = [e["message"] for e in events.collected if e["event"] == "warning"]
    assert any("gets no .yaml" in w and "released shape" in w for w in warnings)
