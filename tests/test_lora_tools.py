"""models/lora_tools.py: a LoRA baked into a checkpoint (``lora merge``) and pulled out of a fine-tune
(``lora extract``), checked against the weights they must give."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_families import build_tiny_sdxl, write_family_config_folder, write_tiny_single_file

from dreambooth.__main__ import main
from dreambooth.engine import run
from dreambooth.errors import ConfigError, ModelFormatError
from dreambooth.events import Events
from dreambooth.models.export import checkpoint_tensors, config_metadata, save_checkpoint
from dreambooth.models.families import family_named
from dreambooth.models.load import load_model, read_config_folder
from dreambooth.models.lora_file import LoraLayer, lora_name, lora_tensors, read_lora
from dreambooth.models.lora_tools import extract_lora, lora_targets, merge_lora

SD1 = family_named("sd1")


@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory, tiny, tokenizer_dir):
    """A LoRA of rank 4 trained for two steps on the tiny SD 1.x model, UNet and text encoder."""
    from conftest import draw_subject

    from dreambooth.config import TrainConfig

    folder = tmp_path_factory.mktemp("lora-run")
    for i in range(2):
        draw_subject(folder / "instance" / f"zwx_{i}.png", seed=i)
    config = TrainConfig.from_dict({
        "model_name": "zwx", "source_checkpoint": str(tiny.path), "model_config_dir": str(tiny.config_dir),
        "tokenizer_dir": str(tokenizer_dir), "resolution": 64, "max_steps": 2, "save_every": 0,
        "learning_rate": 1e-2, "device": "cpu", "save_dtype": "fp32", "method": "lora", "lora_rank": 4,
        "train_text_encoder": True, "prior_preservation": False,
        "concepts": [{"instance_dir": str(folder / "instance"), "instance_prompt": "photo of zwx disc"}],
    })
    events = Events(folder / "zwx" / "logs" / "events.jsonl")
    try:
        return Path(run(config, folder / "zwx", events).checkpoints[-1])
    finally:
        events.close()


def _load(path, tmp_path, tokenizer_dir, config_dir=""):
    return load_model(path, cache_dir=tmp_path / "cache", tokenizer_dir=str(tokenizer_dir), config_dir=str(config_dir))


def _weights(loaded):
    """Every Linear/Conv2d weight of the UNet and text encoder, by LoRA key stem."""
    return {stem: t.weight.detach().clone() for stem, t in lora_targets(loaded.family, loaded).items()}


def test_a_merged_lora_gives_base_plus_its_change_and_leaves_other_layers_alone(tmp_path, tiny, tokenizer_dir,
                                                                                  trained_lora):
    layers, _ = read_lora(trained_lora)
    assert any(s.startswith("lora_te_") for s in layers) and any(s.startswith("lora_unet_") for s in layers)
    base = _weights(_load(tiny.path, tmp_path, tokenizer_dir, tiny.config_dir))
    full = merge_lora(tiny.path, trained_lora, tmp_path / "full.safetensors", dtype="fp32",
                      tokenizer_dir=str(tokenizer_dir), config_dir=str(tiny.config_dir))
    half = merge_lora(tiny.path, trained_lora, tmp_path / "half.safetensors", strength=0.5, dtype="fp32",
                      tokenizer_dir=str(tokenizer_dir), config_dir=str(tiny.config_dir))
    assert full.layers == len(layers)
    assert full.yaml is None and "gets no .yaml: the web UI cannot build" in full.note  # 8 norm groups, as engine
    merged = _weights(_load(full.path, tmp_path, tokenizer_dir))  # the file carries its configs
    halved = _weights(_load(half.path, tmp_path, tokenizer_dir))
    for stem, layer in layers.items():
        delta = layer.delta().reshape(base[stem].shape)
        assert delta.abs().max() > 0, stem
        torch.testing.assert_close(merged[stem], base[stem] + delta, rtol=0, atol=1e-6)
        torch.testing.assert_close(halved[stem] - base[stem], delta / 2, rtol=1e-4, atol=1e-6)
    untouched = [s for s in base if s not in layers]
    conv_in = lora_name(SD1, "unet", "conv_in", tiny.components.unet.config)
    assert conv_in in untouched and "lora_te_text_model_encoder_layers_0_mlp_fc1" not in untouched
    for stem in untouched:
        assert torch.equal(merged[stem], base[stem]), stem
    with safe_open(str(full.path), framework="pt") as f:
        header = f.metadata()
    training = json.loads(header["dreambooth.training"])
    assert header["modelspec.description"] == f"tiny-sd1.safetensors with the LoRA {trained_lora.name} merged in " \
        "at strength 1"
    assert training["merged_lora"] == trained_lora.name and training["merged_strength"] == 1.0
    assert training["lora_training"]["train_text_encoder"] is True  # the LoRA's own summary, kept


CHANGED = (("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
           ("unet", "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
           ("unet", "down_blocks.0.resnets.0.conv1"),
           ("text_encoder", "encoder.layers.1.self_attn.v_proj"))
"""The layers :func:`_low_rank_change` changes: two attention projections, a 3×3 conv, a text-encoder layer."""


def _low_rank_change(components, rank, seed=1):
    """A copy of ``components`` with a known change of rank ``rank`` on the :data:`CHANGED` layers:
    {LoRA key stem: change}."""
    tuned = copy.deepcopy(components)
    generator = torch.Generator().manual_seed(seed)
    changed = {}
    for part, path in CHANGED:
        weight = _module(getattr(tuned, part), path).weight
        change = (torch.randn(weight.shape[0], rank, generator=generator)
                  @ torch.randn(rank, weight[0].numel(), generator=generator)).reshape(weight.shape) * 0.01
        with torch.no_grad():
            weight.add_(change)
        changed[lora_name(SD1, part, path, components.unet.config)] = change
    return tuned, changed


def test_an_extract_merged_back_gives_the_tuned_weights(tmp_path, tiny, tokenizer_dir):
    tuned, changed = _low_rank_change(tiny.components, rank=3)
    tuned_path = save_checkpoint(tmp_path / "tuned.safetensors", checkpoint_tensors(tuned, tiny.extra))
    extract = extract_lora(tiny.path, tuned_path, tmp_path / "extract.safetensors", rank=4, alpha=2,
                           layers="attention_ff_conv", text_encoder=True, dtype="fp32",
                           tokenizer_dir=str(tokenizer_dir), config_dir=str(tiny.config_dir))
    layers, header = read_lora(extract)
    assert set(layers) == set(changed)  # the layers the fine-tune left alone are left out
    assert "lora_te_text_model_encoder_layers_1_self_attn_v_proj" in layers
    assert header["ss_network_dim"] == "4" and header["ss_network_alpha"] == "2"
    assert header["ss_base_model_version"] == "sd_v1"
    conv = layers[lora_name(SD1, "unet", "down_blocks.0.resnets.0.conv1", tiny.components.unet.config)]
    assert conv.down.shape == (4, 32, 3, 3) and conv.up.shape == (32, 4, 1, 1)
    for stem, change in changed.items():  # rank 3 ≤ 4: exact but for rounding
        torch.testing.assert_close(layers[stem].delta(), change, rtol=0, atol=1e-5)
    merged = merge_lora(tiny.path, extract, tmp_path / "merged.safetensors", dtype="fp32",
                        tokenizer_dir=str(tokenizer_dir), config_dir=str(tiny.config_dir))
    got = _load(merged.path, tmp_path, tokenizer_dir).components
    for part, path in CHANGED:
        torch.testing.assert_close(_module(getattr(got, part), path).weight,
                                   _module(getattr(tuned, part), path).weight, rtol=0, atol=1e-5)


def test_an_extract_of_lower_rank_is_the_best_approximation(tmp_path, tiny, tokenizer_dir):
    tuned, changed = _low_rank_change(tiny.components, rank=6)
    tuned_path = save_checkpoint(tmp_path / "tuned.safetensors", checkpoint_tensors(tuned, tiny.extra))
    extract = extract_lora(tiny.path, tuned_path, tmp_path / "extract.safetensors", rank=2, dtype="fp32",
                           tokenizer_dir=str(tokenizer_dir), config_dir=str(tiny.config_dir))
    layers, _ = read_lora(extract)
    assert set(layers) == set(list(changed)[:2])  # --layers attention, no --text-encoder: the others are not taken
    for stem, delta in ((stem, layer.delta()) for stem, layer in layers.items()):
        change = changed[stem]
        u, s, vh = torch.linalg.svd(change)
        best = u[:, :2] * s[:2] @ vh[:2]
        torch.testing.assert_close(delta, best, rtol=0, atol=1e-5)
        assert (change - delta).norm() < change.norm()


def _tiny_sdxl_file(tmp_path, tokenizer_dir):
    """The tiny SDXL as one file that carries its configs."""
    sdxl = build_tiny_sdxl(tokenizer_dir)
    configs = read_config_folder(write_family_config_folder(sdxl, tmp_path / "sdxl-config", "sdxl"))
    return write_tiny_single_file(sdxl, "sdxl", tmp_path / "sdxl.safetensors", config_metadata(configs))


def test_an_sdxl_lora_merges_into_sdxl_by_kohyas_names(tmp_path, tokenizer_dir):
    base_path = _tiny_sdxl_file(tmp_path, tokenizer_dir)
    torch.manual_seed(0)
    layers = {  # as kohya's sdxl_train_network names them: the UNet by the single file's names
        "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q": LoraLayer(torch.randn(2, 64),
                                                                                torch.randn(64, 2), 1.0),
        "lora_unet_input_blocks_1_0_in_layers_2": LoraLayer(torch.randn(2, 32, 3, 3), torch.randn(32, 2, 1, 1), 2.0),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": LoraLayer(torch.randn(2, 32), torch.randn(32, 2), 2),
        "lora_te2_text_model_encoder_layers_1_mlp_fc1": LoraLayer(torch.randn(2, 48), torch.randn(96, 2), 2.0),
    }
    lora = tmp_path / "sdxl-lora.safetensors"
    save_file(lora_tensors(layers, torch.float32), str(lora))
    merged = merge_lora(base_path, lora, tmp_path / "merged.safetensors", dtype="fp32",
                        tokenizer_dir=str(tokenizer_dir))
    assert merged.layers == 4 and merged.yaml is None and "SDXL only in the released shape" in merged.note
    base = _load(base_path, tmp_path, tokenizer_dir).components
    got = _load(merged.path, tmp_path, tokenizer_dir).components
    where = {"lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q":
             ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
             "lora_unet_input_blocks_1_0_in_layers_2": ("unet", "down_blocks.0.resnets.0.conv1"),
             "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
             ("text_encoder", "encoder.layers.0.self_attn.q_proj"),
             "lora_te2_text_model_encoder_layers_1_mlp_fc1": ("text_encoder_2", "encoder.layers.1.mlp.fc1")}
    for stem, (part, path) in where.items():
        before, after = (_module(getattr(c, part), path).weight for c in (base, got))
        torch.testing.assert_close(after, before + layers[stem].delta(), rtol=0, atol=1e-6)
    assert torch.equal(_module(got.unet, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k").weight,
                       _module(base.unet, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k").weight)


def _module(model, path):
    """A module by its path, with or without transformers 4's ``text_model.`` level."""
    modules = dict(model.named_modules())
    return modules.get(path) or modules["text_model." + path]


def test_an_sdxl_lora_does_not_merge_into_sd1_and_nothing_is_written(tmp_path, tiny, tokenizer_dir):
    sdxl = build_tiny_sdxl(tokenizer_dir)
    unet_stem = lora_name(family_named("sdxl"), "unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                          sdxl.unet.config)
    layers = {unet_stem: LoraLayer(torch.randn(2, 64), torch.randn(64, 2), 2.0),
              "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": LoraLayer(torch.randn(2, 32),
                                                                                 torch.randn(32, 2), 2.0)}
    lora = tmp_path / "sdxl-lora.safetensors"
    save_file(lora_tensors(layers, torch.float16), str(lora))
    out = tmp_path / "merged.safetensors"
    with pytest.raises(ModelFormatError, match="does not fit this SD 1.x model") as caught:
        merge_lora(tiny.path, lora, out, tokenizer_dir=str(tokenizer_dir), config_dir=str(tiny.config_dir))
    assert unet_stem == "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q"  # SDXL's names, as kohya's
    assert "2 of its 2 layers" in caught.value.message and unet_stem in caught.value.message
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in caught.value.message
    assert "this model's family (SD 1.x)" in caught.value.advice
    assert not out.exists() and not out.with_suffix(".yaml").exists()


def test_a_lora_of_another_shape_does_not_merge(tmp_path, tiny, tokenizer_dir):
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    lora = tmp_path / "wide.safetensors"
    save_file(lora_tensors({stem: LoraLayer(torch.randn(2, 320), torch.randn(320, 2), 2.0)}, torch.float16),
              str(lora))
    with pytest.raises(ModelFormatError, match="another shape") as caught:
        merge_lora(tiny.path, lora, tmp_path / "merged.safetensors", tokenizer_dir=str(tokenizer_dir),
                   config_dir=str(tiny.config_dir))
    assert stem in str(caught.value)
    assert not (tmp_path / "merged.safetensors").exists()


def test_a_file_that_is_not_a_lora_does_not_merge(tmp_path, tiny, tokenizer_dir):
    with pytest.raises(ModelFormatError, match="not a LoRA"):
        merge_lora(tiny.path, tiny.path, tmp_path / "merged.safetensors", tokenizer_dir=str(tokenizer_dir),
                   config_dir=str(tiny.config_dir))
    assert not (tmp_path / "merged.safetensors").exists()


def test_extract_refuses_a_rank_over_a_layer_width_and_models_of_two_families(tmp_path, tiny, tokenizer_dir):
    tuned, _ = _low_rank_change(tiny.components, rank=1)
    tuned_path = save_checkpoint(tmp_path / "tuned.safetensors", checkpoint_tensors(tuned, tiny.extra))
    out = tmp_path / "extract.safetensors"
    with pytest.raises(ConfigError, match="--rank 33 is more than the width") as caught:
        extract_lora(tiny.path, tuned_path, out, rank=33, tokenizer_dir=str(tokenizer_dir),
                     config_dir=str(tiny.config_dir))
    assert "--rank 32 or less" in caught.value.advice
    sdxl_path = _tiny_sdxl_file(tmp_path, tokenizer_dir)
    sd1_path = save_checkpoint(tmp_path / "sd1.safetensors", checkpoint_tensors(tiny.components, tiny.extra),
                               config_metadata(read_config_folder(tiny.config_dir)))  # both carry their configs
    with pytest.raises(ModelFormatError, match="The base is SD 1.x and the tuned model SDXL"):
        extract_lora(sd1_path, sdxl_path, out, rank=2, tokenizer_dir=str(tokenizer_dir))
    assert not out.exists()


def test_the_command_line_merges_and_reports_a_bad_lora(tmp_path, tiny, tokenizer_dir, trained_lora, capsys):
    common = ["--tokenizer-dir", str(tokenizer_dir), "--config-dir", str(tiny.config_dir)]
    out = tmp_path / "merged.ckpt"
    assert main(["lora", "merge", str(tiny.path), str(trained_lora), str(out), "--strength", "0.8", *common]) == 0
    printed = capsys.readouterr()
    assert printed.out.strip() == str(out) and out.is_file()
    assert "warning: merged.ckpt gets no .yaml" in printed.err
    assert main(["lora", "extract", str(tiny.path), str(out), str(tmp_path / "x.safetensors"), "--rank", "99",
                 *common]) == 1
    assert "error: --rank 99 is more than the width" in capsys.readouterr().err
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    bad = subprocess.run([sys.executable, "-m", "dreambooth", "lora", "merge", str(tiny.path), str(tiny.path),
                          str(tmp_path / "bad.safetensors"), *common], capture_output=True, text=True, env=env)
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: ") and "is not a LoRA" in bad.stderr
    assert not (tmp_path / "bad.safetensors").exists()
