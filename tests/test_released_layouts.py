"""Full-size SDXL and SD 2.x, built from the shipped configs on the meta device (no weights, no download): the
exporter writes exactly the tensor names and shapes of the released single files (``tests/data/released_layouts``,
made from Stability's reference code, not from diffusers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dreambooth.models.families import family_named

LAYOUTS = Path(__file__).parent / "data" / "released_layouts"
SD2_SCHEDULE_BUFFERS = {
    "alphas_cumprod", "alphas_cumprod_prev", "betas", "log_one_minus_alphas_cumprod", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "posterior_variance", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
}
"""LatentDiffusion's noise-schedule buffers: a single-file source's are carried over unchanged; loaders that read
them recompute them from the schedule when they are absent."""


def _meta_components(family_name: str, prediction: str = "epsilon"):
    import transformers
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from dreambooth.models.components import Components

    family = family_named(family_name)
    folder = family.stock_config_folder(prediction)
    config = {name: json.loads((folder / name / "config.json").read_text())
              for name in ("unet", "vae", *family.text_encoder_names)}
    with init_empty_weights():
        encoders = {
            name: getattr(transformers, family.text_encoder_classes[name])(transformers.CLIPTextConfig(**config[name]))
            for name in family.text_encoder_names
        }
        unet = UNet2DConditionModel.from_config(config["unet"])
        vae = AutoencoderKL.from_config(config["vae"])
    return family, Components(unet=unet, vae=vae, tokenizer=None, scheduler=None, **encoders)


def _ours(family, components) -> dict[str, list[int]]:
    tensors = family.export_tensors(components)
    for key, value in family.placeholder_tensors(components).items():
        tensors.setdefault(key, value)
    return {key: list(value.shape) for key, value in tensors.items()}


def test_sdxl_export_is_the_released_base_layout():
    released = json.loads((LAYOUTS / "sdxl_base.json").read_text())["tensors"]
    ours = _ours(*_meta_components("sdxl"))
    assert sorted(set(ours) ^ set(released)) == []
    assert {k: ours[k] for k in released} == released


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_sd2_export_is_the_released_layout_but_the_unused_last_text_layer(prediction):
    released = json.loads((LAYOUTS / "sd2.json").read_text())["tensors"]
    ours = _ours(*_meta_components("sd2", prediction))
    assert set(ours) - set(released) == set()
    unused_layer = {k for k in released if k.startswith("cond_stage_model.model.transformer.resblocks.23.")}
    assert len(unused_layer) == 12
    # what diffusers' 23-layer text encoder does not hold comes from the source file (models.load keeps it)
    assert set(released) - set(ours) == unused_layer | SD2_SCHEDULE_BUFFERS
    assert {k: released[k] for k in ours} == ours


def test_the_refiner_and_the_base_are_told_apart_by_their_released_keys(tmp_path):
    from dreambooth.errors import ModelFormatError
    from dreambooth.models.families import identify_single_file

    refiner = {k: tuple(v) for k, v in json.loads((LAYOUTS / "sdxl_refiner.json").read_text())["tensors"].items()}
    base = {k: tuple(v) for k, v in json.loads((LAYOUTS / "sdxl_base.json").read_text())["tensors"].items()}
    sd2 = {k: tuple(v) for k, v in json.loads((LAYOUTS / "sd2.json").read_text())["tensors"].items()}
    with pytest.raises(ModelFormatError, match="SDXL refiner"):
        identify_single_file(refiner, tmp_path / "sd_xl_refiner_1.0.safetensors")
    assert identify_single_file(base, tmp_path / "sd_xl_base_1.0.safetensors").name == "sdxl"
    assert identify_single_file(sd2, tmp_path / "v2-1_768-ema-pruned.safetensors").name == "sd2"
