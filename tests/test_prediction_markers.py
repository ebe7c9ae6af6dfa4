"""What the engine writes for a checkpoint of the released shape tells both web UIs its prediction type: Forge by
its own rule (``tests/forge_prediction_rule.py``, checked against a Forge checkout when ``SD_WEBUI_DIR`` points at
one), the web UI 1.10 by the yaml beside it (the same as its own config for SD 2.x 768-v)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
import yaml
from forge_prediction_rule import forge_reads_prediction
from host_contract import is_forge

from dreambooth.models.export import checkpoint_tensors, save_checkpoint_for_hosts
from dreambooth.models.families import family_named
from dreambooth.models.load import LoadedModel, _set_prediction
from dreambooth.models.read import read_shapes

WEBUI = os.environ.get("SD_WEBUI_DIR")


def _write_stock(fixture, family: str, prediction: str, folder: Path) -> tuple[set[str], dict | None]:
    """Save ``fixture``'s weights as a file of ``family``'s released shape trained for ``prediction`` (configs as
    the loader sets them for a stock file), the way the engine saves; the file's keys and the yaml beside it."""
    from diffusers import DDPMScheduler

    components = fixture.components
    epsilon = DDPMScheduler.from_config(components.scheduler.config, prediction_type="epsilon")
    loaded = LoadedModel(dataclasses.replace(components, scheduler=epsilon), family, "id")
    _set_prediction(loaded, prediction, stock=True)
    path = folder / f"{family}-{prediction}.safetensors"
    tensors = checkpoint_tensors(loaded.components, None, torch.float16, loaded.family)
    written, note = save_checkpoint_for_hosts(path, tensors, {}, loaded.family, loaded.diffusers_config, prediction)
    assert not note
    assert written in (None, path.with_suffix(".yaml"))
    yaml_path = path.with_suffix(".yaml")
    return set(read_shapes(path)), yaml.safe_load(yaml_path.read_text()) if yaml_path.exists() else None


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_forge_reads_the_trained_prediction_type_from_what_the_engine_writes(
        request, family: str, prediction: str, tmp_path: Path) -> None:
    fixture = request.getfixturevalue({"sd1": "tiny", "sd2": "tiny_sd2", "sdxl": "tiny_sdxl"}[family])
    keys, beside = _write_stock(fixture, family, prediction, tmp_path)
    assert forge_reads_prediction(family, keys, beside) == prediction
    if prediction == "epsilon" or family == "sdxl":
        assert beside is None  # the web UIs need none: SDXL's v is the v_pred tensor in the file
    else:  # the web UI 1.10 builds the model from this yaml: it must say v too
        assert beside["model"]["params"]["parameterization"] == "v"


def test_the_sd2_v_yaml_is_the_web_uis_own_768_v_config(tiny_sd2, tmp_path: Path) -> None:
    """Beside an SD 2.x 768-v file the web UI builds from our yaml what it builds from its own
    ``v2-inference-v.yaml`` (its config for a stock SD 2.x file it tests as v): the same LDM classes and shapes."""
    _keys, ours = _write_stock(tiny_sd2, "sd2", "v_prediction", tmp_path)
    params = ours["model"]["params"]
    assert params["cond_stage_config"]["target"] == "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"
    assert params["cond_stage_config"]["params"]["layer"] == "penultimate"
    unet = params["unet_config"]["params"]
    assert (unet["model_channels"], unet["context_dim"], unet["num_head_channels"]) == (320, 1024, 64)
    assert unet["use_linear_in_transformer"] and params["image_size"] * 8 == 768
    if WEBUI and not is_forge(Path(WEBUI)):  # sd_models_config.config_sd2v: Stability's repository's configs
        stability = Path(WEBUI) / "repositories" / "stable-diffusion-stability-ai" / "configs" / "stable-diffusion"
        theirs = yaml.safe_load((stability / "v2-inference-v.yaml").read_text())
        # but the latent size, which no loader reads: Stability's file says 64 (its 512 px value), ours 768 / 8
        assert theirs["model"]["params"].pop("image_size") == 64 and params.pop("image_size") == 96
        assert ours == theirs


def test_an_sdxl_v_model_of_the_released_shape_needs_no_yaml_and_no_warning(tiny_sdxl, tmp_path: Path) -> None:
    """The stock SDXL shape predicting v is a stock model (its configs are the shipped sdxl-v folder's), so it gets
    no "the web UI cannot build this model" warning: the v_pred tensor is all either web UI needs."""
    from diffusers import DDPMScheduler

    components = dataclasses.replace(tiny_sdxl.components, scheduler=DDPMScheduler.from_config(
        tiny_sdxl.components.scheduler.config, prediction_type="epsilon"))
    loaded = LoadedModel(components, "sdxl", "id")
    _set_prediction(loaded, "v_prediction", stock=True)
    assert loaded.diffusers_config is None
    assert family_named("sdxl").host_yaml_problems(loaded.diffusers_config, "v_prediction") is None


@pytest.mark.skipif(not WEBUI or not is_forge(Path(WEBUI)), reason="set SD_WEBUI_DIR to a Forge checkout to run")
def test_forges_loader_still_reads_these_markers() -> None:
    loader = (Path(WEBUI) / "backend" / "loader.py").read_text(encoding="utf-8")
    assert "os.path.splitext(sd)[0] + '.yaml'" in loader
    assert ".get('parameterization', '')" in loader and ".VScaling" in loader
    guess = Path(WEBUI) / "repositories" / "huggingface_guess" / "huggingface_guess" / "model_list.py"
    if guess.is_file():
        assert '"v_pred" in state_dict' in guess.read_text(encoding="utf-8")
