"""A model of non-stock shape carries its config folder in its file, and its checkpoints carry a web-UI .yaml.

The rule for "non-stock": the diffusers configs build other models (or another noise schedule) than the shipped
SD 1.x config folder, ``dreambooth/models/configs/sd1``; names, versions and dtypes do not count. The tiny test
models and the demo model are non-stock; an SD 1.5-shaped model is stock and the web UI's default yaml fits it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from dreambooth.demo.run import DEMO_CHECKPOINT, DEMO_CONFIG_DIR
from dreambooth.demo.sampling import sample_images
from dreambooth.engine import _save, run
from dreambooth.errors import ModelFormatError
from dreambooth.events import Events
from dreambooth.models.export import CONFIG_METADATA_KEY, checkpoint_tensors, save_checkpoint
from dreambooth.models.host_yaml import hub_cache, web_ui_cannot_build
from dreambooth.models.load import (
    CONFIGS_DIR,
    LoadedModel,
    embedded_config,
    is_stock_config,
    load_model,
    read_config_folder,
)
from dreambooth.models.read import read_tensors


def _header(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def _same_tensors(loaded: LoadedModel, path: Path) -> bool:
    ours, theirs = checkpoint_tensors(loaded.components, loaded.extra_tensors), read_tensors(path)
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k].to(ours[k].dtype)) for k in ours)


def test_the_stock_rule_compares_what_builds_the_models_not_names_or_versions(tiny):
    stock = read_config_folder(CONFIGS_DIR / "sd1")
    assert is_stock_config(stock, "sd1")
    renamed = copy.deepcopy(stock)
    renamed["unet/config.json"]["_diffusers_version"] = "0.99.0"
    renamed["text_encoder/config.json"].update(torch_dtype="float16", bos_token_id=49406, eos_token_id=49407)
    renamed["vae/config.json"]["sample_size"] = 256  # tiling only (sd-vae-ft-mse says 256)
    renamed["scheduler/scheduler_config.json"]["_class_name"] = "DDIMScheduler"
    assert is_stock_config(renamed, "sd1")
    for name, key, value in [
        ("unet/config.json", "cross_attention_dim", 1024),
        ("vae/config.json", "scaling_factor", 0.5),
        ("text_encoder/config.json", "num_hidden_layers", 11),
        ("scheduler/scheduler_config.json", "prediction_type", "v_prediction"),
    ]:
        changed = copy.deepcopy(stock)
        changed[name][key] = value
        assert not is_stock_config(changed, "sd1"), (name, key)
    assert not is_stock_config(read_config_folder(tiny.config_dir), "sd1")
    assert not is_stock_config(read_config_folder(DEMO_CONFIG_DIR), "sd1")


def test_the_shipped_demo_file_carries_its_config_folder():
    carried = embedded_config(DEMO_CHECKPOINT)
    assert carried == read_config_folder(DEMO_CONFIG_DIR)
    assert json.loads(_header(DEMO_CHECKPOINT)[CONFIG_METADATA_KEY]) == carried


def test_the_demo_model_loads_without_a_config_folder_and_draws_the_same_picture(tmp_path, tokenizer_dir):
    folder = load_model(DEMO_CHECKPOINT, cache_dir=tmp_path / "c1", tokenizer_dir=str(tokenizer_dir),
                        config_dir=str(DEMO_CONFIG_DIR))
    alone = load_model(DEMO_CHECKPOINT, cache_dir=tmp_path / "c2", tokenizer_dir=str(tokenizer_dir))
    assert alone.diffusers_config == folder.diffusers_config == read_config_folder(DEMO_CONFIG_DIR)
    assert alone.components.unet.config.block_out_channels == folder.components.unet.config.block_out_channels
    pictures = []
    for loaded in (folder, alone):
        c = loaded.components
        with torch.no_grad():
            pictures.append(
                sample_images(c, ["a red circle"] * 2, seed=0, steps=4)
            )
    assert pictures[0].std() > 0 and (pictures[0] == pictures[1]).all()


def test_a_checkpoint_trained_from_the_demo_model_loads_alone_and_has_its_web_ui_yaml(
    make_config, model_dir, tmp_path, tokenizer_dir
):
    output = tmp_path / "Stable-diffusion" / "zwx"
    config = make_config(
        source_checkpoint=str(DEMO_CHECKPOINT),
        model_config_dir="",
        prior_preservation=False,
        max_steps=2,
        output_dir=str(output),
    )
    checkpoint = run(config, model_dir, Events()).checkpoints[-1]
    assert checkpoint == output / "zwx_2.safetensors"
    assert json.loads(_header(checkpoint)[CONFIG_METADATA_KEY]) == read_config_folder(DEMO_CONFIG_DIR)

    params = yaml.safe_load(checkpoint.with_suffix(".yaml").read_text(encoding="utf-8"))["model"]["params"]
    unet = params["unet_config"]["params"]
    assert unet["model_channels"] == 64 and unet["channel_mult"] == [1, 2, 2] and unet["context_dim"] == 64
    assert params["image_size"] == unet["image_size"] == 8 and "parameterization" not in params
    name = params["cond_stage_config"]["params"]["version"]
    entry = hub_cache() / ("models--" + name.replace("/", "--"))
    snapshot = entry / "snapshots" / (entry / "refs" / "main").read_text()
    assert json.loads((snapshot / "config.json").read_text())["hidden_size"] == 64
    assert (snapshot / "vocab.json").is_file() and (snapshot / "merges.txt").is_file()

    again = load_model(checkpoint, cache_dir=tmp_path / "c", tokenizer_dir=str(tokenizer_dir))
    assert again.diffusers_config == read_config_folder(DEMO_CONFIG_DIR)
    assert _same_tensors(again, checkpoint)
    base = read_tensors(DEMO_CHECKPOINT)
    trained = read_tensors(checkpoint)
    assert any(not torch.equal(base[k].float(), trained[k].float()) for k in base if k.startswith("model."))


def test_a_stock_model_gets_no_config_key_and_no_yaml(make_config, tiny, tmp_path):
    config = make_config()
    stock = LoadedModel(components=tiny.components, family="sd1", source_id="s", diffusers_config=None)
    path = _save(config, stock, tmp_path / "stock", 1, Events())
    assert CONFIG_METADATA_KEY not in _header(path) and "modelspec.architecture" in _header(path)
    assert sorted(p.name for p in (tmp_path / "stock").iterdir()) == ["zwx_1.safetensors"]

    shaped = LoadedModel(
        components=tiny.components,
        family="sd1",
        source_id="s",
        diffusers_config=_web_ui_buildable(tiny.config_dir),
    )
    path = _save(config, shaped, tmp_path / "tiny", 1, Events())
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == [
        "zwx_1.safetensors",
        "zwx_1.yaml",
    ]
    assert CONFIG_METADATA_KEY in _header(path)


def test_a_shape_the_web_ui_cannot_build_gets_its_configs_but_no_yaml_and_a_warning(make_config, tiny, tmp_path):
    """The tiny model normalises in 8 groups; the web UI's LDM code has 32 built in, so a yaml would only move the
    failure into the web UI's loader ("num_channels must be divisible by num_groups")."""
    config = make_config()
    seen = []
    shaped = LoadedModel(tiny.components, "sd1", "s", diffusers_config=read_config_folder(tiny.config_dir))
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "zwx_1.yaml").write_text("an older version's yaml, which the web UI fails on")
    path = _save(config, shaped, tmp_path / "tiny", 1, Events(on_event=seen.append))
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["zwx_1.safetensors"]
    warnings = [e["message"] for e in seen if e["event"] == "warning"]
    assert len(warnings) == 1 and "normalises in 8 groups" in warnings[0] and "zwx_1.safetensors" in warnings[0]
    loaded = load_model(path, cache_dir=tmp_path / "c", tokenizer_dir=config.tokenizer_dir)
    assert _same_tensors(loaded, path)


def test_what_the_web_ui_cannot_build_is_named_and_the_demo_model_has_none(tiny):
    assert web_ui_cannot_build(DEMO_CONFIG_DIR) == []
    assert web_ui_cannot_build(_web_ui_buildable(tiny.config_dir)) == []
    configs = read_config_folder(DEMO_CONFIG_DIR)
    for key, value, named in [
        ("norm_num_groups", 16, "UNet normalises in 16 groups"),
        ("attention_head_dim", [5, 10, 20, 20], "head counts differ"),
        ("transformer_layers_per_block", 2, "2 transformer layers"),
        ("use_linear_projection", True, "project linearly"),
        ("layers_per_block", [2, 2, 1, 1], "layers per block differ"),
        ("block_out_channels", [64, 96, 128, 128], "not multiples of the first"),
        ("in_channels", 9, "latents have [4, 9] channels"),
    ]:
        changed = copy.deepcopy(configs)
        changed["unet/config.json"][key] = value
        assert [p for p in web_ui_cannot_build(changed) if named in p], key
    changed = copy.deepcopy(configs)
    changed["vae/config.json"]["norm_num_groups"] = 8
    assert web_ui_cannot_build(changed) == ["its VAE normalises in 8 groups (the web UI's code always uses 32)"]


def _web_ui_buildable(config_dir: Path) -> dict:
    """The tiny model's configs with 32 normalisation groups: a shape the web UI could build (the tensors saved
    beside them stay the tiny model's; only which files appear is tested)."""
    configs = read_config_folder(config_dir)
    for name in ("unet/config.json", "vae/config.json"):
        configs[name]["norm_num_groups"] = 32
    return configs


def test_the_yaml_is_in_place_before_the_checkpoint_and_gone_if_the_checkpoint_fails(
    make_config, tiny, tmp_path, monkeypatch
):
    from dreambooth.models import export

    config = make_config()
    shaped = LoadedModel(tiny.components, "sd1", "s", diffusers_config=_web_ui_buildable(tiny.config_dir))
    output = tmp_path / "out"
    seen_when_writing = []

    def crash(filename, tensors, metadata=None):
        seen_when_writing.append(sorted(p.name for p in output.iterdir() if p.is_file()))
        raise RuntimeError("power cut")

    monkeypatch.setattr(export, "write_safetensors", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        _save(config, shaped, output, 1, Events())
    assert seen_when_writing == [["zwx_1.yaml"]]
    assert [p.name for p in output.iterdir() if p.is_file()] == []


def test_a_broken_config_key_is_a_model_format_error(tmp_path, tiny):
    path = save_checkpoint(
        tmp_path / "m.safetensors", checkpoint_tensors(tiny.components), {CONFIG_METADATA_KEY: "{not json"}
    )
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        embedded_config(path)
    partial = {"model_index.json": {}}
    path = save_checkpoint(
        tmp_path / "p.safetensors", checkpoint_tensors(tiny.components), {CONFIG_METADATA_KEY: json.dumps(partial)}
    )
    with pytest.raises(ModelFormatError, match="lacks unet/config.json"):
        embedded_config(path)
