"""LoRA training on the tiny SD 1.x and SDXL models: what trains, what the file holds, that every layer of the file
adds exactly what the engine's own merged model holds, that diffusers reads it to the same UNet output, resume,
and what bad settings do."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from safetensors import safe_open
from tiny_model import build_tiny_components

from dreambooth.config import ConfigError
from dreambooth.engine import run
from dreambooth.events import CANCEL_FILE, Events
from dreambooth.models.adapters import UNET_LAYERS, adapter_layers, lora_layers
from dreambooth.models.families import family_of
from dreambooth.models.lora_file import (
    layers_of,
    lora_name,
    lora_tensors,
    part_modules,
    read_lora,
    webui_reads_diffusers_unet_names,
)
from dreambooth.models.read import read_tensors
from dreambooth.models.tokenizer import load_clip_tokenizer
from dreambooth.train.trained import LoraAdapters

KEY = re.compile(r"^lora_(unet|te|te1|te2)_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


def _lora_config(make_config, **options):
    return make_config(**{"method": "lora", "lora_rank": 4, "lora_alpha": 2.0, "learning_rate": 1e-2, **options})


def test_a_lora_run_writes_the_web_uis_layout_and_trains_only_the_adapters(make_config, tiny, tmp_path):
    config = _lora_config(make_config, train_text_encoder=True, text_encoder_lr=1e-2, max_steps=3, save_every=2)
    model_dir = tmp_path / "zwx"
    result = run(config, model_dir, Events())
    assert [p.relative_to(model_dir).as_posix() for p in result.checkpoints] == ["loras/zwx_2.safetensors",
                                                                                  "loras/zwx_3.safetensors"]
    layers, header = read_lora(result.checkpoints[-1])
    with safe_open(str(result.checkpoints[-1]), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(KEY.match(k) for k in keys), [k for k in keys if not KEY.match(k)][:3]
    assert {k.split("_")[1] for k in layers} == {"unet", "te"}
    assert {layer.rank for layer in layers.values()} == {4} and {layer.alpha for layer in layers.values()} == {2.0}
    assert all(layer.up.abs().max() > 0 for layer in layers.values())  # peft starts up at zero: they learned
    # every name is a real layer of the model, as the web UI's Lora looks it up
    components = tiny.components
    family = family_of(components)
    known = {lora_name(family, part, name, components.unet.config)
             for part, model in part_modules(components) for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)}
    assert set(layers) <= known
    assert header["ss_network_module"] == "networks.lora" and header["ss_base_model_version"] == "sd_v1"
    assert (header["ss_network_dim"], header["ss_network_alpha"], header["ss_output_name"]) == ("4", "2", "zwx_3")
    assert header["modelspec.architecture"] == "stable-diffusion-v1/lora" and header["ss_steps"] == "3"
    assert result.checkpoints[-1].stat().st_size < tiny.path.stat().st_size / 4


def _with_random_adapters(components, layers: str = "attention_ff_conv", rank: int = 4, alpha: float = 3.0):
    """``components`` with adapters on the UNet and every text encoder, their up weights drawn at random (peft
    starts them at zero, which would make every comparison trivial)."""
    LoraAdapters(rank, alpha, layers).attach(components, list(components.text_encoders))
    generator = torch.Generator().manual_seed(1)
    for _, model in part_modules(components):
        for _, layer in lora_layers(model):
            weight = layer.lora_B["default"].weight
            weight.data = torch.randn(weight.shape, generator=generator) * 0.1
    return components


@pytest.fixture(params=["sd1", "sdxl"])
def family_components(request, tokenizer_dir, tiny_sdxl):
    if request.param == "sd1":
        return build_tiny_components(load_clip_tokenizer(tokenizer_dir), seed=0)
    return copy.deepcopy(tiny_sdxl.components)


def test_every_layer_of_the_file_adds_what_the_engines_merged_model_holds(family_components, tmp_path):
    components = _with_random_adapters(family_components)
    family = family_of(components)
    path = tmp_path / "zwx.safetensors"
    from safetensors.torch import save_file

    save_file(lora_tensors(layers_of(family, components, adapter_layers(components)), torch.float16), str(path))
    in_file, _ = read_lora(path)
    compared = set()
    for part, model in part_modules(components):
        for name, layer in lora_layers(model):
            base = layer.get_base_layer().weight.detach().clone()
            layer.merge(safe_merge=True)
            merged = layer.get_base_layer().weight.detach().clone()
            layer.unmerge()
            stem = lora_name(family, part, name, components.unet.config)
            assert torch.allclose(base + in_file[stem].delta(), merged, atol=2e-3, rtol=1e-3), stem
            assert not torch.equal(base, merged), stem
            compared.add(stem)
    assert compared == set(in_file)
    prefixes = {stem.split("_")[1] for stem in in_file}
    if family.name == "sdxl":  # SGM names for the UNet, as kohya writes them and the web UI places them
        assert prefixes == {"unet", "te1", "te2"}
        assert any(s.startswith("lora_unet_input_blocks_") for s in in_file)
        assert not any(s.startswith("lora_unet_down_blocks_") for s in in_file)
    else:  # the tiny SD 1.x UNet has one layer a level, not the released layout: single-file names too
        assert prefixes == {"unet", "te"}                # (tests/test_lora_webui_names.py: which layouts get which)
        assert any(s.startswith("lora_unet_input_blocks_") for s in in_file)


@pytest.mark.parametrize("layers", sorted(UNET_LAYERS))
def test_lora_layers_picks_the_unet_layers_that_get_adapters(layers, tokenizer_dir):
    components = build_tiny_components(load_clip_tokenizer(tokenizer_dir), seed=0)
    LoraAdapters(4, 4.0, layers).attach(components, [])
    adapted = {name.rsplit(".", 1)[-1] if not name.endswith(("to_out.0", "ff.net.2")) else name
               for name, _ in lora_layers(components.unet)}
    has = {"attention": any(n.endswith("to_q") for n in adapted),
           "ff": any("ff.net" in n for n in adapted),
           "conv": any(n in ("conv1", "conv2") for n in adapted)}
    assert has == {"attention": True, "ff": layers != "attention", "conv": layers == "attention_ff_conv"}
    assert not any(True for _ in lora_layers(components.text_encoder))  # the text encoder was not asked for
    assert all(p.requires_grad == ("lora_" in n) for n, p in components.unet.named_parameters())


def test_rank_and_alpha_set_the_adapters_shape_and_strength(tokenizer_dir):
    deltas = {}
    for rank, alpha in ((2, 2.0), (4, 2.0), (4, 8.0)):
        components = _with_random_adapters(build_tiny_components(load_clip_tokenizer(tokenizer_dir), seed=0),
                                           "attention", rank, alpha)
        layers = layers_of(family_of(components), components, adapter_layers(components))
        stem = next(s for s in layers if s.endswith("attn1_to_q"))
        assert layers[stem].down.shape[0] == rank
        deltas[rank, alpha] = layers[stem].delta()
    assert torch.allclose(deltas[4, 8.0], 4 * deltas[4, 2.0])  # the same adapters, at alpha / rank four times


def test_diffusers_reads_our_lora_and_its_unet_gives_the_engines_output(family_components, tmp_path):
    from diffusers.utils import USE_PEFT_BACKEND

    if not USE_PEFT_BACKEND:
        pytest.skip("diffusers without its peft backend (the web UI's pins: transformers 4.30) cannot load LoRAs; "
                    "the modern profile runs this")
    from safetensors.torch import save_file

    from dreambooth.models.pipeline import inference_pipeline

    plain = copy.deepcopy(family_components)
    ours = _with_random_adapters(family_components, "attention_ff")
    family = family_of(ours)
    path = tmp_path / "zwx.safetensors"
    save_file(lora_tensors(layers_of(family, ours, adapter_layers(ours)), torch.float32), str(path))
    pipeline = inference_pipeline(family, plain)
    # a UNet of another layout than the released ones (the tiny SD 1.x: one layer a level) has single-file names in
    # the file, which diffusers maps back with the UNet's own layout when given its config (its SDXL pipelines pass
    # it themselves, its SD 1.x/2.x ones do not): the README tells diffusers users the same
    mapped_by_diffusers = family.lora_unet_names == "ldm" or webui_reads_diffusers_unet_names(plain.unet.config)
    extra_arguments = {} if mapped_by_diffusers else {"unet_config": plain.unet.config}
    pipeline.load_lora_weights(str(path), **extra_arguments)
    config = ours.unet.config
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, config.in_channels, 8, 8, generator=generator)
    context = torch.randn(1, 77, config.cross_attention_dim, generator=generator)
    extra = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, pooled, generator=generator),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}}
    with torch.no_grad():
        expected = ours.unet(sample, 500, context, **extra).sample
        got = pipeline.unet(sample, 500, context, **extra).sample
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    ids = torch.randint(0, 1000, (1, 77), generator=generator)
    for name in family.text_encoder_names:
        with torch.no_grad():
            a = getattr(ours, name)(ids, output_hidden_states=True).hidden_states[-2]
            b = getattr(pipeline, name)(ids, output_hidden_states=True).hidden_states[-2]
        assert torch.allclose(a, b, atol=1e-4), name


def test_a_lora_run_resumes_bit_for_bit_from_a_snapshot_of_its_adapters(make_config, tmp_path):
    config = _lora_config(make_config, max_steps=6, train_text_encoder=True, text_encoder_lr=1e-2, hflip=True)
    straight = run(config, tmp_path / "a" / "zwx", Events())
    interrupted = tmp_path / "b" / "zwx"

    def cancel_at_3(event: dict) -> None:
        if event["event"] == "step" and event["step"] == 3:
            (interrupted / CANCEL_FILE).touch()

    first = run(config, interrupted, Events(on_event=cancel_at_3))
    assert first.cancelled and first.step == 3
    snapshot = next((interrupted / "state").glob("step_*"))
    saved = read_tensors(snapshot / "unet.safetensors")
    assert saved and all("lora_" in k for k in saved)  # adapters only, not the frozen UNet
    resumed = run(config, interrupted, Events())
    assert resumed.losses == straight.losses[3:]
    a, b = read_tensors(straight.checkpoints[-1]), read_tensors(resumed.checkpoints[-1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_rank_wider_than_a_layer_is_refused_before_anything_is_written(make_config, tmp_path):
    model_dir = tmp_path / "zwx"
    seen: list[dict] = []
    with pytest.raises(ConfigError, match="more than the width") as error:
        run(make_config(method="lora", lora_rank=512), model_dir, Events(on_event=seen.append))
    assert "Set 'lora_rank' to" in error.value.advice
    assert any(e["event"] == "error" and "lora_rank" in e["message"] for e in seen)
    assert not (model_dir / "loras").exists() and not (model_dir / "class_images").exists()  # refused at once


def test_a_lora_saved_as_ckpt_is_refused(make_config, tmp_path):
    with pytest.raises(ConfigError, match=r"\.safetensors only"):
        run(make_config(method="lora", save_format="ckpt"), tmp_path / "zwx", Events())


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_sd2_and_sdxl_lora_runs_name_their_family_for_the_web_uis_lora_tab(family, make_config, tiny_sd2, tiny_sdxl,
                                                                          tmp_path):
    tiny = {"sd2": tiny_sd2, "sdxl": tiny_sdxl}[family]
    encoders = {"train_text_encoder": True, "text_encoder_lr": 1e-2}
    if family == "sdxl":
        encoders |= {"train_text_encoder_2": True, "text_encoder_2_lr": 1e-2}
    config = _lora_config(make_config, source_checkpoint=str(tiny.path), model_config_dir=str(tiny.config_dir),
                          max_steps=2, prior_preservation=False, **encoders)
    result = run(config, tmp_path / "zwx", Events())
    layers, header = read_lora(result.checkpoints[-1])
    prefixes = {stem.split("_")[1] for stem in layers}
    expected = {"sd2": ({"unet", "te"}, "sd_v2", "stable-diffusion-v2-768-v/lora"),
                "sdxl": ({"unet", "te1", "te2"}, "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora")}[family]
    assert (prefixes, header["ss_base_model_version"], header["modelspec.architecture"]) == expected
    still = sorted(s for s, layer in layers.items() if not layer.up.abs().max() > 0)
    assert not still, still
    assert header["ss_v_parameterization"] == str(family == "sd2")  # the tiny SD 2.x predicts v


@pytest.mark.parametrize("path", [{"weights_dtype": "bf16"}, {"weights_dtype": "bf16", "optimizer": "adamw_8bit"},
                                  {"optimizer_in_backward": True, "optimizer": "adafactor", "weights_dtype": "bf16"},
                                  {"optimizer_in_backward": True}, {"gradient_checkpointing": True}])
def test_the_fast_paths_train_the_adapters(path, make_config, tmp_path):
    seen: list[dict] = []
    result = run(_lora_config(make_config, max_steps=2, prior_preservation=False, **path), tmp_path / "zwx",
                 Events(on_event=seen.append))
    started = next(e for e in seen if e["event"] == "started")
    if path.get("weights_dtype") == "bf16" or path.get("optimizer_in_backward"):
        flat = {"adamw": "FlatAdamW", "adamw_8bit": "FlatAdamW8bit", "adafactor": "FlatAdafactor"}
        assert started["optimizer"].startswith(flat[path.get("optimizer", "adamw")]), started["optimizer"]
    layers, _ = read_lora(result.checkpoints[-1])
    assert all(layer.up.abs().max() > 0 for layer in layers.values())
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_previews_are_rendered_with_the_lora_applied(make_config, tmp_path):
    def preview(learning_rate: float) -> bytes:
        seen: list[dict] = []
        config = _lora_config(make_config, max_steps=2, prior_preservation=False, sample_every=2, sample_steps=2,
                              learning_rate=learning_rate, concept={"sample_prompts": ["photo of zwx disc"]})
        run(config, tmp_path / str(learning_rate) / "zwx", Events(on_event=seen.append))
        paths = [p for e in seen if e["event"] == "sample" for p in e["paths"]]
        assert len(paths) == 1
        return open(paths[0], "rb").read()

    assert preview(5e-2) != preview(0.0)  # at rate 0 the adapters add nothing: the base model's picture
