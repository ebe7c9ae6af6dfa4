"""The v-prediction markers Forge honours (host/prediction_markers.py), and their source in a Forge checkout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from host_contract import is_forge

from dreambooth.host.prediction_markers import (
    V_PREDICTION_TENSOR,
    forge_prediction_marker,
    forge_reads_prediction,
)

WEBUI = os.environ.get("SD_WEBUI_DIR")


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_the_marker_makes_forge_read_the_trained_prediction_type(family: str, prediction: str) -> None:
    marker = forge_prediction_marker(family, prediction)
    yaml = {"model": {"params": {"parameterization": marker.yaml_parameterization}}} \
        if marker.yaml_parameterization else None
    keys = {"model.diffusion_model.out.2.weight", *marker.tensors}
    assert forge_reads_prediction(family, keys, yaml) == prediction


def test_only_sdxl_gets_the_tensor_and_only_sd1_sd2_v_the_yaml() -> None:
    assert forge_prediction_marker("sdxl", "v_prediction").tensors == (V_PREDICTION_TENSOR,)
    assert forge_prediction_marker("sdxl", "v_prediction").yaml_parameterization is None
    assert forge_prediction_marker("sd2", "v_prediction").tensors == ()
    assert forge_prediction_marker("sd2", "v_prediction").yaml_parameterization == "v"
    assert forge_prediction_marker("sd1", "epsilon") == forge_prediction_marker("sdxl", "epsilon")
    assert forge_reads_prediction("sd2", {V_PREDICTION_TENSOR}, None) == "epsilon"  # the tensor is SDXL's only
    with pytest.raises(ValueError):
        forge_prediction_marker("sd3", "v_prediction")


@pytest.mark.skipif(not WEBUI or not is_forge(Path(WEBUI)), reason="set SD_WEBUI_DIR to a Forge checkout to run")
def test_forges_loader_still_reads_these_markers() -> None:
    loader = (Path(WEBUI) / "backend" / "loader.py").read_text(encoding="utf-8")
    assert "os.path.splitext(sd)[0] + '.yaml'" in loader
    assert ".get('parameterization', '')" in loader and ".VScaling" in loader
    guess = Path(WEBUI) / "repositories" / "huggingface_guess" / "huggingface_guess" / "model_list.py"
    if guess.is_file():
        assert '"v_pred" in state_dict' in guess.read_text(encoding="utf-8")
