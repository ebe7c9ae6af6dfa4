"""Run by a real web UI's Python (``tests/test_host_contract.py`` when ``SD_WEBUI_DIR`` is set): the shipped demo
model and the ``.yaml`` our ``yaml`` command writes for it, loaded by the web UI's own loader and sampled by its own
txt2img on the CPU; the demo's evaluator (pixel statistics, no learned weights) scores the pictures. Then the
demo's DreamBooth training (default settings, a few minutes on the CPU) saves into the web UI's checkpoint folder,
and the web UI loads the trained file and draws the subject with it. Prints JSON lines of scores, then
``DEMO-IN-HOST OK``.

Usage: python a1111_demo_in_host.py <webui dir> <this repository> <empty data dir>
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from importlib import import_module
from pathlib import Path

webui, repo, data = (Path(a).resolve() for a in sys.argv[1:4])
checkpoints = data / "models" / "Stable-diffusion"
checkpoints.mkdir(parents=True)
checkpoint = checkpoints / "shapes-sd1.safetensors"
shutil.copyfile(repo / "dreambooth" / "demo" / "model" / "shapes-sd1.safetensors", checkpoint)

os.chdir(webui)
sys.path.insert(0, str(webui))
sys.argv = ["webui.py", "--data-dir", str(data), "--no-download-sd-model", "--skip-torch-cuda-test", "--use-cpu",
            "all", "--no-half", "--no-half-vae", "--precision", "full"]

import numpy as np
from modules import initialize

initialize.imports()
from modules import processing, script_loading, sd_models, shared

# our package as the web UI loads the extension (scripts/dreambooth.py imports it under its own name)
sys.path.insert(0, str(repo))
package = script_loading.load_module(str(repo / "scripts" / "dreambooth.py")).PACKAGE
sys.path.remove(str(repo))
embedded_config = import_module(f"{package}.models.load").embedded_config
write_host_yaml = import_module(f"{package}.models.host_yaml").write_host_yaml
judge_batch = import_module(f"{package}.demo.evaluate").judge_batch
yaml = write_host_yaml(checkpoint, embedded_config(checkpoint))  # what `python -m dreambooth yaml` does
assert yaml == checkpoint.with_suffix(".yaml"), yaml

sd_models.list_models()
info = sd_models.get_closet_checkpoint_match("shapes-sd1.safetensors")
assert info is not None, sd_models.checkpoint_tiles()
sd_models.load_model(info)
assert shared.sd_model is not None and Path(shared.sd_model.sd_checkpoint_info.filename) == checkpoint



def draw(prompt: str, count: int = 8) -> np.ndarray:
    """``count`` pictures of ``prompt`` from the web UI's own txt2img (DDIM, 15 steps, 64x64), as uint8 RGB."""
    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=shared.sd_model, prompt=prompt, negative_prompt="", sampler_name="DDIM", steps=15, cfg_scale=5.0,
        width=64, height=64, batch_size=count, n_iter=1, seed=1, do_not_save_samples=True, do_not_save_grid=True,
    )
    return np.stack([np.asarray(image.convert("RGB")) for image in processing.process_images(p).images[:count]])


PROMPTS = {  # prompt -> (shape, colour, background) the picture must show
    "a red circle on a blue background": ("circle", "red", "blue"),
    "a yellow square on a black background": ("square", "yellow", "black"),
    "a green triangle on a white background": ("triangle", "green", "white"),
}
scores = {}
for prompt, (shape, colour, background) in PROMPTS.items():
    verdicts = judge_batch(draw(prompt))
    scores[prompt] = {
        "shape": sum(v.shape == shape for v in verdicts) / len(verdicts),
        "colour": sum(v.colour == colour for v in verdicts) / len(verdicts),
        "background": sum(v.background == background for v in verdicts) / len(verdicts),
    }
print(json.dumps(scores))
for prompt, score in scores.items():
    assert min(score.values()) >= 0.5, (prompt, score)

# the demo's DreamBooth run (default settings, prior preservation, CPU) saving into the web UI's checkpoint folder,
# then the web UI's own loader and txt2img on the trained file: "a zwx shape" draws the subject
demo = import_module(f"{package}.demo.run")
engine = import_module(f"{package}.engine")
Events = import_module(f"{package}.events").Events
instance_dir = demo.write_instance_images(data / "zwx", seed=0, captions=False)
config = demo.demo_config("shapes-zwx", instance_dir, checkpoint, demo.DEMO_CONFIG_DIR, demo.settings(quick=False),
                          prior=True, seed=0)
config.output_dir = str(checkpoints / "shapes-zwx")
trained = engine.run(config, data / "dreambooth" / "shapes-zwx", Events()).checkpoints[-1]
assert trained.with_suffix(".yaml").is_file(), "the engine writes the yaml beside each checkpoint"
sd_models.list_models()
sd_models.load_model(sd_models.get_closet_checkpoint_match(f"shapes-zwx/{trained.name}"))
assert Path(shared.sd_model.sd_checkpoint_info.filename) == trained
subject = sum(v.is_subject for v in judge_batch(draw(demo.INSTANCE_PROMPT))) / 8
print(json.dumps({"trained": trained.name, "subject fidelity in the web UI": subject}))
assert subject >= 0.5, subject
print("DEMO-IN-HOST OK")
