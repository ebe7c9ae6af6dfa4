"""Forge's rule for the prediction type of a single file, restated as a test oracle (checked against a Forge
checkout by ``tests/test_prediction_markers.py`` when ``SD_WEBUI_DIR`` points at one).

Read from Forge's ``backend/loader.py`` (``forge_loader``, ``split_state_dict``) and huggingface_guess at the commit
Forge's launcher names (84826248, ``model_list.py``), and from the AUTOMATIC1111 web UI 1.10's
``modules/sd_models_config.py``:

- Forge reads the family from the weights and needs no yaml for it. The prediction type comes from a ``.yaml``
  beside the file (same name) when that yaml says v: ``model.params.parameterization: "v"`` (SD 1.x/2.x style), or
  ``model.params.denoiser_config.params.scaling_config.target`` ending in ``.VScaling`` (SDXL style); any other
  yaml content is ignored by Forge. Without such a yaml it uses the guess from the weights: for SDXL a tensor named
  ``v_pred`` in the file means v-prediction (``edm_vpred.sigma_max`` means v-EDM); for SD 1.x nothing in the
  weights ever means v; for SD 2.x huggingface_guess's std test of
  ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` looks the key up without the ``model.diffusion_model.``
  prefix of a single file, so it never fires there: an SD 2.x v file without the yaml samples as epsilon.
- The web UI 1.10 also honours the ``v_pred`` tensor for SDXL (``config_sdxlv``), and for SD 1.x/2.x the full
  LDM yaml beside the file (its own SD 2 std test does work, on the prefixed key). Both read a ``ztsnr`` tensor
  as zero-terminal-SNR (the web UI applies it; Forge records it and does not use it).

So: **SDXL v → a ``v_pred`` tensor in the state dict (no yaml); SD 1.x/2.x v → a yaml beside the file with
``model.params.parameterization: v``; epsilon → nothing.**
"""

from __future__ import annotations

V_PREDICTION_TENSOR = "v_pred"


def forge_reads_prediction(family: str, tensor_keys: set[str], yaml: dict | None) -> str:
    """The prediction type Forge's loader settles on for a single file (its rule, restated for tests):
    ``"v_prediction"`` or ``"epsilon"``."""
    params = ((yaml or {}).get("model") or {}).get("params") or {}
    named = params.get("parameterization") or (
        ((params.get("denoiser_config") or {}).get("params") or {}).get("scaling_config") or {}).get("target") or ""
    if named == "v" or str(named).endswith(".VScaling"):
        return "v_prediction"
    if family == "sdxl" and V_PREDICTION_TENSOR in tensor_keys:
        return "v_prediction"
    return "epsilon"
