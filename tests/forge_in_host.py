"""Run by a real Forge's Python (``tests/test_host_contract.py`` when ``SD_WEBUI_DIR`` names a Forge checkout):
install the extension into a fresh data folder, start Forge's modules the way its webui.py does (on the CPU), and
exercise ``ForgeHost``, the callbacks and ``preload.py`` against them: its checkpoint dropdown's names, its
progress state and Interrupt, its queue, its memory manager, its checkpoint switch, its Lora list; then supervise a
short training and a short LoRA training from the demo model and find their files in Forge's lists at once.
Prints ``FORGE-IN-HOST OK``.

Forge cannot build the demo model (it only loads the stock shapes), so generating with a trained checkpoint in
Forge's txt2img is left to a full-size run by hand (docs/forge.md).

Usage: python forge_in_host.py <forge dir> <this repository> <empty data dir>
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from importlib import import_module
from pathlib import Path

forge, repo, data = (Path(a).resolve() for a in sys.argv[1:4])
(data / "extensions").mkdir(parents=True)
(data / "extensions" / "dreambooth-under-test").symlink_to(repo, target_is_directory=True)
checkpoints = data / "models" / "Stable-diffusion"
checkpoints.mkdir(parents=True)
os.chdir(forge)
sys.path.insert(0, str(forge))
sys.argv = ["webui.py", "--data-dir", str(data), "--no-download-sd-model", "--api-auth", "alice:pw",
            "--dreambooth-dir", str(data / "db-models"), "--skip-torch-cuda-test", "--always-cpu",
            "--skip-version-check"]

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

save_file({"w": torch.zeros(2)}, str(checkpoints / "base.safetensors"))

from modules_forge.initialization import initialize_forge

initialize_forge()
from modules import initialize

initialize.imports()
from backend import memory_management
from modules import call_queue, script_callbacks, script_loading, sd_models, shared
from modules_forge import main_entry

assert shared.cmd_opts.dreambooth_dir == str(data / "db-models"), "preload.py did not add --dreambooth-dir"
sd_models.list_models()

sys.path.insert(0, str(repo))  # what Forge does while it loads an extension's scripts/
entry = script_loading.load_module(str(repo / "scripts" / "dreambooth.py"))
sys.path.remove(str(repo))
extension = sys.modules[f"{entry.PACKAGE}.extension"]
ForgeHost = sys.modules[f"{entry.PACKAGE}.host.forge"].ForgeHost
Host = sys.modules[f"{entry.PACKAGE}.host.base"].WebUi
assert f"{entry.PACKAGE}.host.a1111" not in sys.modules, "Forge must get its own adapter, not the web UI's"
for kind, function in [("ui_tabs", extension.ui_tabs), ("app_started", extension.app_started),
                       ("ui_settings", extension.ui_settings)]:
    assert any(c.callback is function for c in script_callbacks.callback_map[f"callbacks_{kind}"]), kind

host = ForgeHost()
assert isinstance(host, Host)
assert host.models_dir == data / "models", host.models_dir
assert host.loras_dir == data / "models" / "Lora", host.loras_dir
assert host.checkpoint_titles() == ["base.safetensors"], host.checkpoint_titles()
assert host.checkpoint_file("base.safetensors") == checkpoints / "base.safetensors"
(checkpoints / "zwx").mkdir()
save_file({"w": torch.ones(2)}, str(checkpoints / "zwx" / "zwx_2.safetensors"))
host.refresh_checkpoints()
titles = host.checkpoint_titles()
assert "zwx/zwx_2.safetensors" in titles, titles
assert main_entry.refresh_models()[0] == titles, "Forge's own dropdown lists what the tab lists"

host.job_started("DreamBooth: zwx", 10)
assert shared.state.job == "DreamBooth: zwx" and shared.state.sampling_steps == 10
host.job_progress(3, 10, "step 3/10")
assert shared.state.sampling_step == 3 and shared.state.textinfo == "step 3/10"
assert not host.interrupt_requested()
shared.state.interrupt()  # what the Interrupt button and /sdapi/v1/interrupt do
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


# Forge's memory manager: a model it holds leaves and comes back through its own functions.
patcher = sys.modules["backend.patcher.base"].ModelPatcher(
    torch.nn.Linear(2, 2), load_device=memory_management.get_torch_device(),
    offload_device=memory_management.unet_offload_device())
memory_management.load_models_gpu([patcher])
assert [m.model for m in memory_management.current_loaded_models] == [patcher]
assert queue_is_free()
host.unload_model()
assert not queue_is_free(), "training must hold Forge's queue"
assert memory_management.current_loaded_models == []
host.reload_model()
assert queue_is_free()
assert [m.model for m in memory_management.current_loaded_models] == [patcher], "Forge's model came back"

# a checkpoint chosen during a run is handed to Forge as its own dropdown does; Forge loads it lazily
host.unload_model()
title = host.select_checkpoint(checkpoints / "zwx" / "zwx_2.safetensors")
assert title == "zwx/zwx_2.safetensors" and shared.opts.sd_model_checkpoint == title
host.reload_model()
assert queue_is_free()
chosen = sd_models.model_data.forge_loading_parameters["checkpoint_info"]
assert Path(chosen.filename) == checkpoints / "zwx" / "zwx_2.safetensors", chosen.filename

extension.ui_settings()
assert {"dreambooth_unload_model", "dreambooth_cancel_timeout"} <= set(shared.opts.data_labels)
supervisor = extension.supervisor()
assert supervisor.dreambooth_dir == data / "db-models" and supervisor.checkpoints_dir == checkpoints
assert supervisor.loras_dir == data / "models" / "Lora"
short = sd_models.get_closet_checkpoint_match("base.safetensors").calculate_shorthash()
for i, name in enumerate(["base.safetensors", "base", short, f"base.safetensors [{short}]"]):
    assert supervisor.create_model(f"alias{i}", name).source_checkpoint == str(checkpoints / "base.safetensors")

from fastapi import FastAPI

app = FastAPI()
extension.app_started(None, app)
routes = [r for r in app.routes if getattr(r, "path", "").startswith("/dreambooth/v1/")]
assert routes and all(r.dependencies for r in routes), "the API must be mounted behind --api-auth"
tabs = extension.ui_tabs()
assert [(title, elem_id) for _, title, elem_id in tabs] == [("DreamBooth", "dreambooth")]

# Forge's built-in Lora, loaded as Forge loads it (its folder on sys.path, networks imported by its script)
lora_extension = forge / "extensions-builtin" / "sd_forge_lora"
sys.path.insert(0, str(lora_extension))
networks = import_module("networks")

# a real training and a LoRA training supervised inside Forge, from the shipped demo model
TrainConfig = import_module(f"{entry.PACKAGE}.config").TrainConfig
find_tokenizer_dir = import_module(f"{entry.PACKAGE}.models.tokenizer").find_tokenizer_dir
tokenizer_dir = find_tokenizer_dir(None, data / "tokenizer")
shutil.copyfile(repo / "dreambooth" / "demo" / "model" / "shapes-sd1.safetensors", checkpoints / "shapes.safetensors")
photos = data / "photos"
photos.mkdir()
for i in range(3):
    Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(photos / f"{i}.png")
host.refresh_checkpoints()
for name, method in (("tiny-zwx", "full"), ("tiny-lora", "lora")):
    config = supervisor.create_model(name, "shapes.safetensors")
    config = TrainConfig.from_dict({**config.to_dict(), "tokenizer_dir": str(tokenizer_dir), "resolution": 64,
                                    "max_steps": 4, "save_every": 2, "device": "cpu", "save_dtype": "fp32",
                                    "prior_preservation": False, "method": method,
                                    "concepts": [{"instance_dir": str(photos), "instance_prompt": "a zwx shape"}]})
    supervisor.start(config)
    assert not queue_is_free() and supervisor.running_model() == name
    assert supervisor.wait(300)
    status = supervisor.status()
    assert status.finished and status.error is None, status
    assert queue_is_free() and shared.state.job == ""
assert {"tiny-zwx/tiny-zwx_2.safetensors", "tiny-zwx/tiny-zwx_4.safetensors"} <= set(host.checkpoint_titles())
assert {"tiny-zwx/tiny-zwx_2.safetensors", "tiny-zwx/tiny-zwx_4.safetensors"} <= set(main_entry.refresh_models()[0])
assert {"tiny-lora_2", "tiny-lora_4"} <= set(networks.available_networks), sorted(networks.available_networks)
print("FORGE-IN-HOST OK")
