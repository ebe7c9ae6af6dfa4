"""Every UNet layer of a LoRA file we write is the layer the web UI's Lora patches (its lookup restated in
``tests/webui_lora_rule.py``): the one the exported checkpoint holds that module's weight under. The web UI's
diffusers-name conversion has the released SD 1.x/2.x block layout built in, so the demo model (one layer a level)
and the tests' tiny models get single-file names; released layouts keep the diffusers names kohya's SD 1.x/2.x
LoRAs use. Full-size models are built on the meta device (no weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_model import TINY_UNET
from webui_lora_rule import webui_unet_layer

from dreambooth.models.families import family_named
from dreambooth.models.layout import unet_to_ldm
from dreambooth.models.lora_file import lora_name

CONFIGS = Path(__file__).parents[1] / "dreambooth" / "models" / "configs"
DEMO = Path(__file__).parents[1] / "dreambooth" / "demo" / "model" / "config"


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


CASES = {
    "sd1 released": ("sd1", lambda: _json(CONFIGS / "sd1" / "unet" / "config.json"), "diffusers"),
    "sd2 released": ("sd2", lambda: _json(CONFIGS / "sd2" / "unet" / "config.json"), "diffusers"),
    "sdxl released": ("sdxl", lambda: _json(CONFIGS / "sdxl" / "unet" / "config.json"), "ldm"),
    "demo model": ("sd1", lambda: _json(DEMO / "unet" / "config.json"), "ldm"),
    "tests' tiny sd1": ("sd1", lambda: dict(TINY_UNET), "ldm"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_unet_layer_of_a_lora_is_the_layer_the_web_uis_lora_patches(case):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    family_name, config, naming = CASES[case]
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config())
    exported = {diffusers_key: ldm_key for diffusers_key in unet.state_dict()
                for ldm_key in unet_to_ldm({diffusers_key: torch.empty(0)}, unet.config)}
    webui_layers = {k.removeprefix("model.").removesuffix(".weight").replace(".", "_")
                    for k in exported.values() if k.endswith(".weight")}
    family = family_named(family_name)
    wrong = {}
    stems = []
    for name, module in unet.named_modules():
        if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            continue
        stem = lora_name(family, "unet", name, unet.config)
        stems.append(stem)
        expected = exported[name + ".weight"].removeprefix("model.").removesuffix(".weight").replace(".", "_")
        if (found := webui_unet_layer(stem, webui_layers)) != expected:
            wrong[stem] = found
    assert len(stems) > 20 and not wrong, f"{len(wrong)} of {len(stems)} layers missed: {list(wrong.items())[:3]}"
    diffusers_named = sum(s.startswith(("lora_unet_down_blocks_", "lora_unet_up_blocks_")) for s in stems)
    assert (diffusers_named > 0) == (naming == "diffusers"), (case, stems[:3])
