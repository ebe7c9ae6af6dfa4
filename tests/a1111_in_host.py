"""Run by a real web UI's Python (``tests/test_host_contract.py`` when ``SD_WEBUI_DIR`` is set): install the
extension into a fresh data folder, start the web UI's modules the way webui.py does, and exercise
``A1111Host``, the callbacks and ``preload.py`` against them, supervise a short training from the demo model, and
load a checkpoint it saved into the web UI and generate with it (CPU). Prints ``IN-HOST OK``.

Usage: python a1111_in_host.py <webui dir> <this repository> <empty data dir>
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

webui, repo, data = (Path(a).resolve() for a in sys.argv[1:4])
(data / "extensions").mkdir(parents=True)
(data / "extensions" / "dreambooth-under-test").symlink_to(repo, target_is_directory=True)
checkpoints = data / "models" / "Stable-diffusion"
checkpoints.mkdir(parents=True)
os.chdir(webui)
sys.path.insert(0, str(webui))
sys.argv = ["webui.py", "--data-dir", str(data), "--no-download-sd-model", "--api-auth", "alice:pw",
            "--dreambooth-dir", str(data / "db-models"), "--skip-torch-cuda-test", "--use-cpu", "all", "--no-half",
            "--no-half-vae"]

import torch
from safetensors.torch import save_file

save_file({"w": torch.zeros(2)}, str(checkpoints / "base.safetensors"))

from modules import initialize

initialize.imports()
from modules import call_queue, script_callbacks, script_loading, sd_models, shared

assert shared.cmd_opts.dreambooth_dir == str(data / "db-models"), "preload.py did not add --dreambooth-dir"
sd_models.list_models()

sys.path.insert(0, str(repo))  # what the web UI does while it loads an extension's scripts/
entry = script_loading.load_module(str(repo / "scripts" / "dreambooth.py"))
sys.path.remove(str(repo))
assert "dreambooth" not in sys.modules, "the name belongs to d8ahazard's extension too: the entry must not take it"
a1111 = sys.modules[f"{entry.PACKAGE}.extension"]  # the registration (tab, API, settings)
A1111Host = sys.modules[f"{entry.PACKAGE}.host.a1111"].A1111Host
Host = sys.modules[f"{entry.PACKAGE}.host.base"].WebUi
assert f"{entry.PACKAGE}.host.forge" not in sys.modules, "the web UI must get its own adapter, not Forge's"

for kind, function in [("ui_tabs", a1111.ui_tabs), ("app_started", a1111.app_started),
                       ("ui_settings", a1111.ui_settings)]:
    assert any(c.callback is function for c in script_callbacks.callback_map[f"callbacks_{kind}"]), kind

host = A1111Host()
assert isinstance(host, Host)
assert host.models_dir == data / "models", host.models_dir
assert host.checkpoint_titles() == ["base.safetensors"], host.checkpoint_titles()
assert host.checkpoint_file("base.safetensors") == checkpoints / "base.safetensors"
(checkpoints / "zwx").mkdir()
save_file({"w": torch.ones(2)}, str(checkpoints / "zwx" / "zwx_2.safetensors"))
host.refresh_checkpoints()
assert "zwx/zwx_2.safetensors" in host.checkpoint_titles(), host.checkpoint_titles()

host.job_started("DreamBooth: zwx", 10)
assert shared.state.job == "DreamBooth: zwx" and shared.state.sampling_steps == 10
host.job_progress(3, 10, "step 3/10")
assert shared.state.sampling_step == 3 and shared.state.textinfo == "step 3/10"
assert not host.interrupt_requested()
shared.state.interrupt()  # what the Interrupt button does
assert host.interrupt_requested()
host.job_finished()
assert shared.state.job == ""


def queue_is_free() -> bool:
    result = []
    thread = threading.Thread(target=lambda: result.append(call_queue.queue_lock.acquire(blocking=False)))
    thread.start()
    thread.join()
    if result[0]:
        call_queue.queue_lock.release()
    return result[0]


assert queue_is_free()
host.unload_model()
assert not queue_is_free(), "training must hold the web UI's queue"
title = host.select_checkpoint(checkpoints / "zwx" / "zwx_2.safetensors")
assert title == "zwx/zwx_2.safetensors" and shared.opts.sd_model_checkpoint == title
host.reload_model()
assert queue_is_free()

a1111.ui_settings()
assert {"dreambooth_unload_model", "dreambooth_cancel_timeout"} <= set(shared.opts.data_labels)
supervisor = a1111.supervisor()
assert supervisor.dreambooth_dir == data / "db-models" and supervisor.checkpoints_dir == checkpoints
config = supervisor.create_model("zwx", "base.safetensors")
assert config.source_checkpoint == str(checkpoints / "base.safetensors")
# every name the web UI's own lookup takes names a source, also after its title got the hash
info = sd_models.get_closet_checkpoint_match("base.safetensors")
short = info.calculate_shorthash()
assert f"base.safetensors [{short}]" in host.checkpoint_titles(), host.checkpoint_titles()
for i, name in enumerate(["base.safetensors", "base", short, f"base [{short}]", f"base.safetensors [{short}]"]):
    assert supervisor.create_model(f"alias{i}", name).source_checkpoint == str(checkpoints / "base.safetensors")

from fastapi import FastAPI

app = FastAPI()
a1111.app_started(None, app)
routes = [r for r in app.routes if getattr(r, "path", "").startswith("/dreambooth/v1/")]
assert routes and all(r.dependencies for r in routes), "the API must be mounted behind --api-auth"

tabs = a1111.ui_tabs()
assert [(title, elem_id) for _, title, elem_id in tabs] == [("DreamBooth", "dreambooth")]

# a real training supervised inside the web UI, from the shipped demo model (small, and a shape the web UI's own
# model code can build): its checkpoints appear in the web UI's list at once
import shutil
from importlib import import_module

import numpy as np
from PIL import Image

TrainConfig = import_module(f"{entry.PACKAGE}.config").TrainConfig
find_tokenizer_dir = import_module(f"{entry.PACKAGE}.models.tokenizer").find_tokenizer_dir

tokenizer_dir = find_tokenizer_dir(None, data / "tokenizer")
shutil.copyfile(repo / "dreambooth" / "demo" / "model" / "shapes-sd1.safetensors", checkpoints / "shapes.safetensors")
photos = data / "photos"
photos.mkdir()
for i in range(3):
    Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(photos / f"{i}.png")
host.refresh_checkpoints()
config = supervisor.create_model("tiny-zwx", "shapes.safetensors")
config = TrainConfig.from_dict({**config.to_dict(), "tokenizer_dir": str(tokenizer_dir), "resolution": 64,
                                "max_steps": 4, "save_every": 2, "device": "cpu", "save_dtype": "fp32",
                                "prior_preservation": False,
                                "concepts": [{"instance_dir": str(photos), "instance_prompt": "a zwx shape"}]})
supervisor.start(config)
assert not queue_is_free() and supervisor.running_model() == "tiny-zwx"
assert supervisor.wait(300)
status = supervisor.status()
assert status.finished and status.error is None, status
assert {"tiny-zwx/tiny-zwx_2.safetensors", "tiny-zwx/tiny-zwx_4.safetensors"} <= set(host.checkpoint_titles())
assert queue_is_free() and shared.state.job == ""

# a saved checkpoint is ready to generate with: the web UI's own loader builds it (through the .yaml saved beside
# it: the demo model is not SD 1.5-shaped) and its own txt2img draws with it
from modules import processing

sd_models.load_model(sd_models.get_closet_checkpoint_match("tiny-zwx/tiny-zwx_4.safetensors"))
assert Path(shared.sd_model.sd_checkpoint_info.filename) == checkpoints / "tiny-zwx" / "tiny-zwx_4.safetensors"
p = processing.StableDiffusionProcessingTxt2Img(
    sd_model=shared.sd_model, prompt="a zwx shape", sampler_name="DDIM", steps=3, width=64, height=64,
    batch_size=1, n_iter=1, seed=1, do_not_save_samples=True, do_not_save_grid=True,
)
images = processing.process_images(p).images
assert images and images[0].size == (64, 64), images
print("IN-HOST OK")
