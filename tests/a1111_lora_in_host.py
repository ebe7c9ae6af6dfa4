"""Run by a real web UI's Python (``tests/test_host_contract.py`` when ``SD_WEBUI_DIR`` is set): a LoRA trained by
the engine (text encoder too, every layer kind ``attention_ff_conv`` adapts) from the shipped demo model (SD 1.x),
written into the web UI's Lora folder, is listed by the web UI's Lora page after ``refresh_loras``, and the web
UI's own built-in Lora (``extensions-builtin/Lora``), asked for it by ``<lora:name:1>`` in a txt2img prompt,
patches into every layer of the model exactly what the engine's merged model holds there:
``W + (alpha / rank) · up @ down``, W read by the engine from the same checkpoint. No key of the file goes
unmatched (the Lora's "didn't match keys" debug line, and one module of it per layer of the file), no layer fails
to apply (its error count). Prints one JSON line of numbers per model, then ``LORA-IN-HOST OK``.

Usage: python a1111_lora_in_host.py <webui dir> <this repository> <empty data dir>
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from importlib import import_module
from pathlib import Path

from lora_log_in_host import watch_unmatched  # beside this script: the first entry of sys.path

webui, repo, data = (Path(a).resolve() for a in sys.argv[1:4])
checkpoints = data / "models" / "Stable-diffusion"
checkpoints.mkdir(parents=True)
os.chdir(webui)
sys.path.insert(0, str(webui))
sys.argv = ["webui.py", "--data-dir", str(data), "--no-download-sd-model", "--skip-torch-cuda-test", "--use-cpu",
            "all", "--no-half", "--no-half-vae", "--precision", "full"]

import numpy as np
import torch
from PIL import Image

torch.set_num_threads(min(4, torch.get_num_threads()))
from modules import initialize

initialize.imports()
from modules import processing, script_callbacks, script_loading, sd_models, shared

# the built-in Lora as the web UI loads it (its folder on sys.path while its scripts/ load: they import its modules)
lora_extension = webui / "extensions-builtin" / "Lora"
sys.path.insert(0, str(lora_extension))
script_loading.load_module(str(lora_extension / "scripts" / "lora_script.py"))
networks = sys.modules["networks"]
script_callbacks.before_ui_callback()  # what webui.py runs before it builds the UI: registers the Lora page

# our package as the web UI loads the extension (scripts/dreambooth.py imports it under its own name)
sys.path.insert(0, str(repo))
package = script_loading.load_module(str(repo / "scripts" / "dreambooth.py")).PACKAGE
sys.path.remove(str(repo))


def ours(module: str, name: str):
    return getattr(import_module(f"{package}.{module}"), name)


TrainConfig, run, Events = ours("config", "TrainConfig"), ours("engine", "run"), ours("events", "Events")
read_lora, lora_name, part_modules = (ours("models.lora_file", n) for n in ("read_lora", "lora_name", "part_modules"))
load_model, embedded_config = ours("models.load", "load_model"), ours("models.load", "embedded_config")
family_of = ours("models.families", "family_of")
write_host_yaml = ours("models.host_yaml", "write_host_yaml")
find_tokenizer_dir = ours("models.tokenizer", "find_tokenizer_dir")
host = sys.modules[f"{package}.host.a1111"].A1111Host()

loras = host.loras_dir
assert loras == Path(shared.cmd_opts.lora_dir) == data / "models" / "Lora", (loras, shared.cmd_opts.lora_dir)
tokenizer_dir = find_tokenizer_dir(None, data / "tokenizer")
photos = data / "photos"
photos.mkdir()
for i in range(3):
    Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(photos / f"{i}.png")


unmatched = watch_unmatched()


def check(name: str, source: Path) -> dict:
    """Train a LoRA of ``source`` into the Lora folder, generate with it in the web UI, compare every patched
    weight with the engine's merged one; the numbers."""
    config = TrainConfig.from_dict({
        "model_name": name, "source_checkpoint": str(source), "tokenizer_dir": str(tokenizer_dir),
        "output_dir": str(loras / name), "resolution": 64, "max_steps": 2, "save_every": 0, "device": "cpu",
        "save_dtype": "fp32", "prior_preservation": False, "method": "lora", "lora_rank": 4, "lora_alpha": 2.0,
        "lora_layers": "attention_ff_conv", "train_text_encoder": True, "learning_rate": 1e-2,
        "text_encoder_lr": 1e-2, "concepts": [{"instance_dir": str(photos), "instance_prompt": "a zwx shape"}]})
    result = run(config, data / "db-models" / name, Events())
    lora = Path(result.checkpoints[-1])
    assert lora == loras / name / f"{name}_2.safetensors", lora
    layers, header = read_lora(lora)
    host.refresh_loras()
    assert lora.stem in networks.available_networks, sorted(networks.available_networks)
    assert Path(networks.available_networks[lora.stem].filename) == lora

    # the base weights as the engine reads them, by the key stem each module gets in a LoRA file
    loaded = load_model(source, cache_dir=data / "cache", tokenizer_dir=str(tokenizer_dir))
    components = loaded.components
    family = family_of(components)
    base = {lora_name(family, part, module, components.unet.config): layer.weight.detach().float()
            for part, model in part_modules(components) for module, layer in model.named_modules()
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d))}
    assert set(layers) <= set(base), sorted(set(layers) - set(base))[:5]

    sd_models.load_model(sd_models.get_closet_checkpoint_match(source.name))
    assert Path(shared.sd_model.sd_checkpoint_info.filename) == source
    unmatched.lines.clear()
    networks.extra_network_lora.errors.clear()
    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=shared.sd_model, prompt=f"a zwx shape <lora:{lora.stem}:1>", sampler_name="DDIM", steps=2,
        width=64, height=64, batch_size=1, n_iter=1, seed=1, do_not_save_samples=True, do_not_save_grid=True)
    images = processing.process_images(p).images
    assert images and [n.name for n in networks.loaded_networks] == [lora.stem], networks.loaded_networks
    net = networks.loaded_networks[0]
    by_stem = {module.network_key.split(".")[0]: module for module in net.modules.values()}
    worst, worst_layer, largest_delta, wrong, patched = 0.0, "", 0.0, [], set()
    tolerance = 1e-3  # fp16's step near 1 (2**-10); the web UI and the engine hold these weights in fp32 here
    for stem in sorted(set(by_stem) & set(layers)):
        module, delta = by_stem[stem].sd_module, layers[stem].delta()
        if isinstance(module, torch.nn.MultiheadAttention):  # OpenCLIP's fused q, k, v (SDXL's te2 in A1111)
            weight = module.in_proj_weight.chunk(3, 0)["qkv".index(stem.rsplit("_", 2)[-2])]
        else:  # a Linear or Conv2d (an MHA's out_proj too: the web UI patches it through its MHA)
            weight = module.weight
        patched.add(id(module))
        merged = base[stem] + delta.reshape(base[stem].shape)
        if weight.numel() != merged.numel():  # the web UI took it for another layer, of another shape
            wrong.append(stem)
            continue
        difference = (weight.detach().float().reshape(merged.shape) - merged).abs().max().item()
        if difference > tolerance:
            wrong.append(stem)
        if difference > worst:
            worst, worst_layer = difference, stem
        largest_delta = max(largest_delta, delta.abs().max().item())
    numbers = {"model": name, "layers_in_file": len(layers), "layers_matched": len(set(by_stem) & set(layers)),
               "modules_patched": len(patched), "parts": sorted({stem.split("_")[1] for stem in layers}),
               "max_abs_difference": worst, "worst_layer": worst_layer, "largest_delta": largest_delta,
               "wrong_layers": wrong, "unmatched_layers": sorted(set(layers) - set(by_stem)),
               "apply_errors": networks.extra_network_lora.errors.get(net.name, 0)}
    print(json.dumps(numbers))
    assert numbers["unmatched_layers"] == [] and unmatched.lines == [], "the web UI left layers of the file unread"
    assert len(net.modules) == len(layers) and numbers["apply_errors"] == 0
    assert wrong == [], f"the web UI patched {len(wrong)} layers with something else than the engine's merge"
    assert largest_delta > 20 * tolerance, largest_delta  # the training moved the adapters: not a trivial match
    return numbers


# SD 1.x: the shipped demo model, with the .yaml our `yaml` command writes for it (it is not SD 1.5-shaped)
demo = checkpoints / "shapes-sd1.safetensors"
shutil.copyfile(repo / "dreambooth" / "demo" / "model" / "shapes-sd1.safetensors", demo)
write_host_yaml(demo, embedded_config(demo))
sd_models.list_models()
check("zwx-sd1", demo)
print("LORA-IN-HOST OK")
