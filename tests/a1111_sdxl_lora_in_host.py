"""Run by a real web UI's Python (``tests/test_host_contract.py`` when ``SD_WEBUI_DIR`` is set): the SDXL side of
``a1111_lora_in_host.py``. A full-size SDXL of the released shape with random weights from a seed is written by our
exporter into the web UI's checkpoint folder; adapters on its UNet (every layer ``attention_ff_conv`` adapts) and on
both text encoders, their up weights drawn at random (peft starts them at zero, which would make every comparison
trivial; training a 2.6 B-parameter UNet on a CPU test machine is out of reach), are written by our LoRA writer into
the web UI's Lora folder. The web UI loads the checkpoint (fp16, ``--precision half``), lists the LoRA after
``refresh_loras``, and its built-in Lora, asked for it by ``<lora:name:1>`` in a txt2img prompt, must patch
``W + (alpha / rank) · up @ down`` into every layer of the file:

- every key of the file matched to a module (no "didn't match keys" line, one module of the network per layer of
  the file, no apply errors);
- the patched weight equals the web UI's backup of W plus the file's delta, over every element (fp16 rounding);
- the backup is our layer's W: the same values at 64 seeded positions and the same sum as the engine's module
  with that LoRA name, so a delta patched into another layer of the same shape is caught too.

Random weights in fp16 plus random deltas may overflow in the UNet on the CPU: the web UI's NaN check is off and
the picture is not judged here (``a1111_families_in_host.py`` does that without a LoRA). Prints one JSON line of
numbers, then ``SDXL-LORA-IN-HOST OK``.

Usage: python a1111_sdxl_lora_in_host.py <webui dir> <this repository> <empty data dir>
"""

from __future__ import annotations

import gc
import json
import sys
from importlib import import_module
from pathlib import Path

from a1111_families_in_host import export, generate, load_package, place_clip_l, seeded_components, start_webui
from lora_log_in_host import watch_unmatched  # beside this script: the first entry of sys.path

RANK, ALPHA = 4, 3.0
SAMPLES = 64  # positions of each weight compared with our model's


def main() -> None:
    webui, repo, data = (Path(a).resolve() for a in sys.argv[1:4])
    checkpoints = data / "models" / "Stable-diffusion"
    checkpoints.mkdir(parents=True)
    start_webui(webui, data, half=True, extra=["--disable-nan-check"])

    import torch
    from modules import script_callbacks, script_loading, sd_models, shared
    from safetensors.torch import save_file

    lora_extension = webui / "extensions-builtin" / "Lora"
    sys.path.insert(0, str(lora_extension))
    script_loading.load_module(str(lora_extension / "scripts" / "lora_script.py"))
    networks = sys.modules["networks"]
    script_callbacks.before_ui_callback()  # registers the Lora page, as webui.py does before it builds the UI
    package = load_package(repo)
    place_clip_l(package)

    def ours(module: str, name: str):
        return getattr(import_module(f"{package}.{module}"), name)

    lora_file = import_module(f"{package}.models.lora_file")
    adapter_layers, lora_layers = ours("models.adapters", "adapter_layers"), ours("models.adapters", "lora_layers")
    LoraAdapters, family_of = ours("train.trained", "LoraAdapters"), ours("models.families", "family_of")
    host = sys.modules[f"{package}.host.a1111"].A1111Host()

    # the seeded SDXL, its single file, adapters with random up weights, and the LoRA file our writer makes of them
    components = seeded_components(package, "sdxl", "epsilon", torch.float16)
    checkpoint = checkpoints / "seeded-sdxl.safetensors"
    assert export(package, components, checkpoint, 1024, torch.float16) is None  # SDXL: no yaml
    LoraAdapters(RANK, ALPHA, "attention_ff_conv").attach(components, list(components.text_encoders))
    generator = torch.Generator().manual_seed(1)
    family = family_of(components)
    fingerprints = {}
    for part, model in lora_file.part_modules(components):
        for name, layer in lora_layers(model):
            up = layer.lora_B["default"].weight
            up.data = (torch.randn(up.shape, generator=generator) * 0.1).to(up.dtype)
            weight = layer.get_base_layer().weight.detach().flatten()
            positions = torch.randint(0, weight.numel(), (SAMPLES,), generator=generator)
            stem = lora_file.lora_name(family, part, name, components.unet.config)
            fingerprints[stem] = (positions, weight[positions].float().clone(), weight.double().sum().item())
    layers = lora_file.layers_of(family, components, adapter_layers(components))
    loras = host.loras_dir
    assert loras == Path(shared.cmd_opts.lora_dir) == data / "models" / "Lora", loras
    lora = loras / "zwx-sdxl.safetensors"
    loras.mkdir(parents=True, exist_ok=True)
    metadata = lora_file.lora_metadata(family, "epsilon", 1024, lora.stem, "zwx-sdxl (random adapters)", layers,
                                       {})
    save_file(lora_file.lora_tensors(layers, torch.float16), str(lora), metadata=metadata)
    del components, layers, model, layer, up, weight  # nothing of our model stays in memory beside the web UI's
    gc.collect()
    in_file, header = lora_file.read_lora(lora)
    assert set(in_file) == set(fingerprints), sorted(set(in_file) ^ set(fingerprints))[:5]
    assert header["ss_base_model_version"] == "sdxl_base_v1-0", header["ss_base_model_version"]

    host.refresh_loras()
    assert lora.stem in networks.available_networks, sorted(networks.available_networks)
    sd_models.list_models()
    sd_models.load_model(sd_models.get_closet_checkpoint_match(checkpoint.name))
    assert shared.sd_model.is_sdxl and Path(shared.sd_model.sd_checkpoint_info.filename) == checkpoint

    unmatched = watch_unmatched()
    networks.extra_network_lora.errors.clear()
    picture = generate(shared.sd_model, f"a photo of zwx <lora:{lora.stem}:1>")
    assert [n.name for n in networks.loaded_networks] == [lora.stem], networks.loaded_networks
    net = networks.loaded_networks[0]
    by_stem = {module.network_key.split(".")[0]: module for module in net.modules.values()}
    out_proj_owner = {id(m.out_proj): m for m in shared.sd_model.modules()
                      if isinstance(m, torch.nn.MultiheadAttention)}

    # the web UI patches a layer when it first runs with the network active: every layer of the file ran (OpenCLIP
    # bigG's last block too: the web UI takes SDXL's pooled text from it)
    wanted = tuple((x.name, x.te_multiplier, x.unet_multiplier, x.dyn_dim) for x in networks.loaded_networks)
    patched_by = {stem: out_proj_owner.get(id(by_stem[stem].sd_module), by_stem[stem].sd_module)
                  for stem in set(by_stem) & set(in_file)}
    not_run = sorted(s for s, m in patched_by.items() if getattr(m, "network_current_names", ()) != wanted)

    tolerance = 1e-3  # fp16's step near 1 (2**-10): the web UI holds this SDXL in fp16
    worst, worst_layer, largest_delta, wrong, misplaced, kinds = 0.0, "", 0.0, [], [], {}
    for stem in sorted(set(by_stem) & set(in_file)):
        module, delta = by_stem[stem].sd_module, in_file[stem].delta()
        if isinstance(module, torch.nn.MultiheadAttention):  # OpenCLIP's fused q, k, v (SDXL's te2 in the web UI)
            which = "qkv".index(stem.rsplit("_", 2)[-2])
            weight = module.in_proj_weight.chunk(3, 0)[which]
            backup = module.network_weights_backup[0].chunk(3, 0)[which]
        elif id(module) in out_proj_owner:  # an MHA's out_proj: patched, and backed up, through its MHA
            weight, backup = module.weight, out_proj_owner[id(module)].network_weights_backup[1]
        else:
            weight, backup = module.weight, module.network_weights_backup
        kind = type(module).__name__
        kinds[kind] = kinds.get(kind, 0) + 1
        if weight.numel() != delta.numel():
            wrong.append(stem)
            continue
        expected = backup.float().reshape(-1) + delta.reshape(-1)
        difference = (weight.detach().float().reshape(-1) - expected).abs().max().item()
        positions, values, total = fingerprints[stem]
        flat = backup.reshape(-1)
        same_sum = abs(flat.double().sum().item() - total) <= 1e-6 * max(1.0, abs(total))
        if not (torch.equal(flat[positions].float(), values) and same_sum):
            misplaced.append(stem)
        if difference > tolerance:
            wrong.append(stem)
        if difference > worst:
            worst, worst_layer = difference, stem
        largest_delta = max(largest_delta, delta.abs().max().item())
    numbers = {"model": "seeded-sdxl", "layers_in_file": len(in_file),
               "layers_matched": len(set(by_stem) & set(in_file)),
               "parts": {p: sum(s.split("_")[1] == p for s in in_file) for p in ("unet", "te1", "te2")},
               "module_kinds": kinds, "max_abs_difference": worst, "worst_layer": worst_layer,
               "largest_delta": largest_delta, "wrong_layers": wrong, "misplaced_layers": misplaced,
               "unmatched_layers": sorted(set(in_file) - set(by_stem)), "unmatched_lines": len(unmatched.lines),
               "not_patched": not_run,
               "apply_errors": networks.extra_network_lora.errors.get(net.name, 0), **picture}
    print(json.dumps(numbers))
    assert numbers["unmatched_layers"] == [] and unmatched.lines == [], "the web UI left layers of the file unread"
    assert len(net.modules) == len(in_file) and numbers["apply_errors"] == 0
    assert wrong == [], f"the web UI patched {len(wrong)} layers with something else than W + delta"
    assert misplaced == [], f"the web UI patched {len(misplaced)} layers of the file into other layers"
    assert all(numbers["parts"].values()), numbers["parts"]
    assert largest_delta > 20 * tolerance, largest_delta
    assert not_run == [], "layers of the file the web UI never patched"
    print("SDXL-LORA-IN-HOST OK")


if __name__ == "__main__":
    main()
