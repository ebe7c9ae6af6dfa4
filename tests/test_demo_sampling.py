"""The demo's sampler for every family, and the SDXL-shaped demo model's pretraining script end to end (seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from tiny_families import build_tiny_sdxl
from tiny_model import build_tiny_components

from dreambooth.demo.sampling import prompt_conditioning, sample_images
from dreambooth.models.load import load_model
from dreambooth.models.tokenizer import load_clip_tokenizer

REPO = Path(__file__).resolve().parents[1]


def test_sdxl_guidance_runs_against_zeros_and_square_time_ids(tokenizer_dir):
    """SDXL's pipeline leaves an empty negative prompt as zeros (``force_zeros_for_empty_prompt``): the demo's
    sampler must guide against the same, with the pictures' own size in the time ids."""
    components = build_tiny_sdxl(tokenizer_dir)
    with torch.no_grad():
        both = prompt_conditioning(components, ["a red circle", "a blue square"], 64, "cpu")
    assert both.context.shape[0] == both.pooled.shape[0] == 4
    assert both.context[:2].abs().sum() > 0 and both.pooled[:2].abs().sum() > 0
    assert both.context[2:].abs().sum() == 0 and both.pooled[2:].abs().sum() == 0
    assert both.time_ids.tolist() == [[64, 64, 0, 0, 64, 64]] * 4


def test_sd1_guidance_runs_against_the_empty_prompt(tokenizer_dir):
    components = build_tiny_components(load_clip_tokenizer(tokenizer_dir))
    with torch.no_grad():
        both = prompt_conditioning(components, ["a red circle", "a blue square"], 64, "cpu")
        empty_ids = components.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        empty = components.text_encoder(empty_ids)[0]
    assert both.pooled is None and both.time_ids is None
    assert torch.equal(both.context[2:], empty.expand(2, -1, -1))
    assert not torch.equal(both.context[0], both.context[2])


def test_sdxl_pretraining_exports_a_demo_model_the_engine_loads_and_samples(tmp_path, tokenizer_dir):
    """``dev/pretrain_demo_model.py train --family sdxl`` for a few seconds, then ``export``: one SGM-layout file
    that loads as SDXL with the shipped SD 1.x demo model's autoencoder and text encoder inside, and draws pictures."""
    run, model = tmp_path / "run", tmp_path / "model"
    script = str(REPO / "dev" / "pretrain_demo_model.py")
    subprocess.run([sys.executable, script, "train", "--family", "sdxl", "--out", str(run), "--unet-seconds", "1",
                    "--batch", "4", "--pool", "64", "--samples", "2", "--tokenizer-dir", str(tokenizer_dir)],
                   check=True, capture_output=True)
    report = json.loads((run / "report.json").read_text())
    assert report["unet_steps"] >= 1 and set(report["accuracy"]) >= {"shape", "colour shape"}
    subprocess.run([sys.executable, script, "export", str(run), str(model)], check=True, capture_output=True)
    loaded = load_model(model / "shapes-sdxl.safetensors", cache_dir=tmp_path / "cache",
                        tokenizer_dir=str(tokenizer_dir), config_dir=str(model / "config"))
    c = loaded.components
    assert loaded.family.name == "sdxl"
    assert c.unet.config.addition_embed_type == "text_time"
    assert c.text_encoder_2.config.hidden_size > c.text_encoder.config.hidden_size
    shipped = load_model(REPO / "dreambooth" / "demo" / "model" / "shapes-sd1.safetensors",
                         cache_dir=tmp_path / "cache1", tokenizer_dir=str(tokenizer_dir),
                         config_dir=str(REPO / "dreambooth" / "demo" / "model" / "config")).components
    def first_query(model: torch.nn.Module) -> torch.Tensor:  # transformers 5's CLIPTextModel has no text_model.
        return next(v for k, v in model.state_dict().items() if k.endswith("encoder.layers.0.self_attn.q_proj.weight"))

    assert torch.equal(first_query(c.text_encoder).half(), first_query(shipped.text_encoder).half())
    with torch.no_grad():
        images = sample_images(c, ["a red circle", "a zwx shape"], seed=0, steps=2)
    assert images.shape == (2, 64, 64, 3) and images.dtype.name == "uint8"


def test_warm_start_gives_the_sdxl_shaped_unet_the_sd1_demo_unets_weights(tokenizer_dir):
    """``--warm-start``: every SD 1.x tensor lands in the SDXL-shaped UNet (1x1 convolutions as linear layers, the
    cross-attention keys and values in the first encoder's columns, zeros in the second's), and SDXL's added
    conditioning starts with its output at zero, so the UNet computes what the SD 1.x one does."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain", REPO / "dev" / "pretrain_demo_model.py")
    pretrain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pretrain)
    sd1 = build_tiny_components(load_clip_tokenizer(tokenizer_dir)).unet
    from diffusers import UNet2DConditionModel

    config = {**dict(sd1.config), "use_linear_projection": True, "addition_embed_type": "text_time",
              "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 16 + 6 * 8,
              "cross_attention_dim": sd1.config.cross_attention_dim + 16}
    unet = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    fresh = pretrain.warm_start(unet, sd1)
    assert fresh and all(name.startswith("add_embedding.") for name in fresh)
    width = sd1.config.cross_attention_dim
    sample = torch.randn(1, 4, 8, 8)
    context = torch.randn(1, 77, width)
    with torch.no_grad():
        expected = sd1(sample, 10, context).sample
        wide = torch.cat([context, torch.randn(1, 77, 16)], dim=-1)  # the second encoder's features have no say
        got = unet(sample, 10, wide, added_cond_kwargs={"text_embeds": torch.randn(1, 16),
                                                      "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}).sample
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_the_shipped_demo_model_unpacked_and_exported_again_is_the_same_file(tmp_path, tokenizer_dir):
    """``unpack`` then ``export`` (the SD 1.x family's exporter, the route every family's demo model takes) gives
    back the shipped file's tensors bit for bit, under its names, with its title and architecture."""
    from safetensors import safe_open

    shipped = REPO / "dreambooth" / "demo" / "model"
    script = str(REPO / "dev" / "pretrain_demo_model.py")
    run, again = tmp_path / "run", tmp_path / "again"
    subprocess.run([sys.executable, script, "unpack", str(shipped), str(run), "--tokenizer-dir", str(tokenizer_dir)],
                   check=True, capture_output=True)
    subprocess.run([sys.executable, script, "export", str(run), str(again)], check=True, capture_output=True)
    with safe_open(str(shipped / "shapes-sd1.safetensors"), "pt") as a, \
            safe_open(str(again / "shapes-sd1.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        differing = [k for k in a.keys() if not torch.equal(a.get_tensor(k), b.get_tensor(k))]
        assert not differing, differing[:5]
        for field in ("modelspec.title", "modelspec.architecture", "modelspec.resolution"):
            assert a.metadata()[field] == b.metadata()[field]
