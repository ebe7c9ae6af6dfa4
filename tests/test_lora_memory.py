"""LoRA memory on the device: each model is there only while it works, so the device's peak is the largest phase's
and not their sum (``engine.py``); and frozen base weights stored in float8 (``lora_base_precision: fp8``,
``train/speed/float8.py``): what a float8 layer computes, that it keeps no 16-bit copy for its backward, that it
composes with peft's adapters and gradient checkpointing, and that a LoRA run with it learns like one without."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_model import build_tiny_components

from dreambooth import engine
from dreambooth.config import ConfigError
from dreambooth.data import cache as cache_module
from dreambooth.engine import run
from dreambooth.events import Events
from dreambooth.models.adapters import lora_layers
from dreambooth.models.lora_file import read_lora
from dreambooth.models.lora_tools import merge_lora
from dreambooth.models.read import read_tensors
from dreambooth.models.tokenizer import load_clip_tokenizer
from dreambooth.train import loop
from dreambooth.train.speed import float8
from dreambooth.train.speed.float8 import (
    Float8Conv2d,
    Float8Linear,
    is_fp8,
    store_frozen_in_fp8,
    upcast_weight,
)
from dreambooth.train.speed.step_graph import enable_checkpointing
from dreambooth.train.trained import LoraAdapters

HOME = torch.device("cpu", 0)
"""Where the test tells the engine to park models: the CPU still, but a device the recorded ``.to()`` calls can tell
apart from the training device (``cpu``)."""
MODELS = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae", "CLIPTextModel": "text_encoder"}


def _lora_config(make_config, **options):
    return make_config(**{"method": "lora", "lora_rank": 4, "lora_alpha": 4.0, "learning_rate": 1e-2, **options})


# ---------------------------------------------------------------- each model on the device only while it works

class Residency:
    """Follows the engine's ``.to()`` calls on the three models and notes which are on the training device at
    each phase: generating class images, caching latents, encoding prompts, each step, each preview."""

    def __init__(self, monkeypatch) -> None:
        self.on_device = set()
        self.phases: list[tuple[str, frozenset]] = []
        original_to = torch.nn.Module.to

        def to(module, *args, **kwargs):
            name = MODELS.get(type(module).__name__)
            device = torch._C._nn._parse_to(*args, **kwargs)[0]
            if name and device is not None:
                if device == torch.device("cpu"):
                    self.on_device.add(name)
                elif device == HOME:
                    self.on_device.discard(name)
                else:
                    raise AssertionError(f"{name} sent to {device}")
            return original_to(module, *args, **kwargs)

        monkeypatch.setattr(torch.nn.Module, "to", to)
        monkeypatch.setattr(engine, "HOME", HOME, raising=False)  # today's engine has none: it never parks
        self._mark(monkeypatch, engine, "generate_class_images", "class images")
        self._mark(monkeypatch, engine, "_samples", "preview")
        self._mark(monkeypatch, loop, "add_noise", "step")
        self._mark(monkeypatch, cache_module.PromptEmbeddings, "_encode", "prompts")
        self._mark(monkeypatch, cache_module.ImageLatents, "_encode", "latents")

    def _mark(self, monkeypatch, owner, attribute: str, phase: str) -> None:
        original = getattr(owner, attribute)

        def marked(*args, **kwargs):
            self.phases.append((phase, frozenset(self.on_device)))
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, attribute, marked)

    def during(self, phase: str) -> set[frozenset]:
        """The sets of models on the device each time ``phase`` ran."""
        return {models for name, models in self.phases if name == phase}


def test_each_model_is_on_the_device_only_while_it_works(make_config, tmp_path, monkeypatch):
    """Caches on: class images with every model there (fp32), then the VAE alone for latents, the text encoder alone
    for embeddings, the UNet alone for the steps; previews borrow the VAE and the text encoder and give them back."""
    residency = Residency(monkeypatch)
    config = _lora_config(make_config, max_steps=2, sample_every=2, sample_steps=1, concept={"num_class_images": 1})
    run(config, tmp_path / "zwx", Events())
    every = frozenset({"unet", "vae", "text_encoder"})
    assert residency.during("class images") == {every}
    assert residency.during("latents") == {frozenset({"vae"})}  # today's engine: all three
    assert residency.during("prompts") == {frozenset({"text_encoder"})}
    assert residency.during("step") == {frozenset({"unet"})}
    assert residency.during("preview") == {every}
    assert residency.on_device == {"unet"}
    order = [name for name, _ in residency.phases]
    assert order.index("step") > max(i for i, name in enumerate(order) if name in ("latents", "prompts"))


def test_without_caches_the_vae_and_the_text_encoder_stay_for_the_steps(make_config, tmp_path, monkeypatch):
    residency = Residency(monkeypatch)
    config = _lora_config(make_config, max_steps=2, sample_every=1, sample_steps=1, prior_preservation=False,
                          cache_latents=False, cache_text_embeddings=False)
    run(config, tmp_path / "zwx", Events())
    every = frozenset({"unet", "vae", "text_encoder"})
    assert residency.during("step") == residency.during("preview") == {every}
    assert residency.during("latents") == residency.during("prompts") == {every}  # encoded within the steps
    assert residency.on_device == every


# ---------------------------------------------------------------- the float8 layer

def _layers(std: float = 0.01):
    """A LayerNorm (the first parameter: stays as it is), a Linear and a zero-padded Conv2d of small weights (the
    scale matters: unscaled, most would fall into float8's subnormals)."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"norm": torch.nn.LayerNorm(16), "linear": torch.nn.Linear(16, 24),
                                 "conv": torch.nn.Conv2d(6, 10, 3, padding=1, stride=2)})
    with torch.no_grad():
        for module in (model["linear"], model["conv"]):
            module.weight.normal_(0, std)
    return model.requires_grad_(False)


def test_a_float8_layer_computes_with_its_weight_rounded_to_float8(monkeypatch):
    original = _layers()
    model = copy.deepcopy(original)
    assert store_frozen_in_fp8(model, torch.float32) == 2
    linear, conv = model["linear"], model["conv"]
    assert type(linear) is Float8Linear and type(conv) is Float8Conv2d and type(model["norm"]) is torch.nn.LayerNorm
    assert is_fp8(linear.weight) and is_fp8(conv.weight) and linear.bias.dtype == torch.float32
    for name in ("linear", "conv"):
        layer, weight = model[name], original[name].weight
        scale = layer.weight_scale
        assert scale == 2.0 ** round(torch.log2(torch.tensor(scale)).item())  # a power of two: exact to divide out
        assert 224 <= layer.weight.float().abs().max() <= 448
        rounded = upcast_weight(layer)
        # round to nearest float8 (3 mantissa bits): at most 1/16 of the weight, or half the smallest subnormal step
        bound = torch.maximum(weight.abs() / 16, torch.full_like(weight, 2.0**-10 * scale))
        assert ((rounded - weight).abs() <= bound).all()
        assert 0 < (rounded - weight).norm() / weight.norm() < 0.04
    x = torch.randn(3, 16, requires_grad=True)
    y = linear(x)
    plain = torch.nn.functional.linear(x, upcast_weight(linear), linear.bias)
    assert torch.allclose(y, plain, atol=1e-6)
    images = torch.randn(2, 6, 9, 9, requires_grad=True)
    out = conv(images)
    plain_conv = torch.nn.functional.conv2d(images, upcast_weight(conv), conv.bias, stride=2, padding=1)
    assert torch.allclose(out, plain_conv, atol=1e-6)
    grads = torch.autograd.grad((y.square().sum(), out.square().sum()), (x, images))
    expected = torch.autograd.grad((plain.square().sum(), plain_conv.square().sum()), (x, images))
    assert all(torch.allclose(g, e, atol=1e-5) for g, e in zip(grads, expected))


def test_a_float8_layer_keeps_no_wide_copy_of_its_weight_for_the_backward():
    """A ``weight.to(dtype)`` in the forward would leave every layer's wide copy alive until the backward (the whole
    16-bit model again); the float8 layers save their float8 weight only."""
    model = _layers()
    store_frozen_in_fp8(model, torch.float32)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model["linear"](torch.randn(3, 16, requires_grad=True)).sum()
        model["conv"](torch.randn(2, 6, 9, 9, requires_grad=True)).sum()
    weights = [t for t in saved if t.shape in (model["linear"].weight.shape, model["conv"].weight.shape)]
    assert weights and all(is_fp8(t) for t in weights)


def test_the_tiny_unet_in_float8_with_adapters_and_checkpointing_matches_its_upcast_twin(tokenizer_dir):
    """peft's adapters over float8 base layers compute what the same adapters over the upcast weights compute, with
    and without gradient checkpointing, and the stored UNet is about half its bf16 size."""
    components = build_tiny_components(load_clip_tokenizer(tokenizer_dir), seed=0)
    bf16_bytes = sum(p.numel() * 2 for p in components.unet.parameters())  # before the adapters
    LoraAdapters(4, 4.0, "attention_ff_conv", base_precision="fp8").place(
        components, [], torch.device("cpu"), torch.float32, resident=[])
    unet = components.unet
    generator = torch.Generator().manual_seed(1)
    for _, layer in lora_layers(unet):
        layer.lora_B["default"].weight.data = torch.randn(layer.lora_B["default"].weight.shape, generator=generator)
    base = [p for n, p in unet.named_parameters() if "lora_" not in n]
    converted = [m for m in unet.modules() if isinstance(m, (Float8Linear, Float8Conv2d))]
    plain = [m for m in unet.modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d)]
    assert converted and all(not is_fp8(p) for m in plain for p in m.parameters())  # adapters and conv_in
    assert unet.conv_in in plain and all(".lora_" in n or n == "conv_in" for n, m in unet.named_modules() if m in plain)
    assert sum(p.numel() for p in base if is_fp8(p)) > 0.95 * sum(p.numel() for p in base)
    assert sum(p.numel() * p.element_size() for p in base) < 0.55 * bf16_bytes  # one byte a weight, and the rest
    twin = copy.deepcopy(unet)
    for module in list(twin.modules()):
        if isinstance(module, (Float8Linear, Float8Conv2d)):
            module.weight.data = upcast_weight(module)
            module.__class__ = torch.nn.Linear if isinstance(module, Float8Linear) else torch.nn.Conv2d
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)

    def adapter_grads(model, checkpointing: bool):
        if checkpointing:
            enable_checkpointing(model)
        model.train()
        out = model(sample, torch.tensor([10, 500]), context).sample
        parameters = [p for n, p in model.named_parameters() if "lora_" in n]
        return out, torch.autograd.grad(out.square().mean(), parameters)

    reference, reference_grads = adapter_grads(twin, False)
    for checkpointing in (False, True):
        out, grads = adapter_grads(unet, checkpointing)
        assert torch.allclose(out, reference, atol=1e-5)
        assert all(torch.allclose(g, r, rtol=1e-4, atol=1e-7) for g, r in zip(grads, reference_grads))


# ---------------------------------------------------------------- the option

def test_fp8_base_weights_are_refused_for_a_full_fine_tune_and_without_float8(make_config, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="none are frozen"):
        run(make_config(lora_base_precision="fp8"), tmp_path / "a" / "zwx", Events())
    monkeypatch.setattr(float8, "FLOAT8", "float8_e4m3fn_of_a_torch_that_has_none")
    model_dir = tmp_path / "b" / "zwx"
    with pytest.raises(ConfigError, match="float8 types") as error:
        run(_lora_config(make_config, lora_base_precision="fp8"), model_dir, Events())
    assert "weights" in error.value.advice
    assert not (model_dir / "class_images").exists()  # refused before anything runs


LOSS_BOUND = 0.008
"""How far the fp8-base run's loss may be from the bf16-base run's at any step. Measured on the tiny SD 1.x model
(10 steps, bf16 weights, lr 1e-2), per step: host profile 0.0056 at step 1 (the adapters still add nothing: the
base's rounding alone) and 0.0060 at most; modern profile 0.0033 at step 1 and 0.0070 at most. The learning itself
takes the loss of steps 6-10 0.16 (host) and 0.14 (modern) below the untrained run's."""


@pytest.mark.slow
def test_a_lora_run_on_fp8_base_weights_learns_like_one_on_bf16(make_config, tmp_path):
    options = {"max_steps": 10, "prior_preservation": False, "weights_dtype": "bf16", "sample_every": 10,
               "sample_steps": 1}
    runs = {}
    for name, extra in {"bf16": {}, "fp8": {"lora_base_precision": "fp8"},
                        "untrained": {"lora_base_precision": "fp8", "learning_rate": 0.0}}.items():
        seen: list[dict] = []
        result = run(_lora_config(make_config, **options, **extra), tmp_path / name / "zwx",
                     Events(on_event=seen.append))
        runs[name] = (result, seen)
    bf16, fp8, untrained = (runs[n][0].losses for n in ("bf16", "fp8", "untrained"))
    # the same seed draws the same noise and timesteps at each step in every run: the losses compare step by step
    assert 0 < abs(fp8[0] - bf16[0])  # the base really is rounded
    assert max(abs(a - b) for a, b in zip(fp8, bf16)) <= LOSS_BOUND
    assert sum(untrained[5:]) / 5 - sum(fp8[5:]) / 5 > 0.1  # it learns
    # the file: the same tensors, shapes and dtypes as a run on bf16 weights; it merges as before
    files = {name: runs[name][0].checkpoints[-1] for name in ("bf16", "fp8")}
    shapes = {}
    for name, path in files.items():
        with safe_open(str(path), framework="pt") as f:
            shapes[name] = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
    assert shapes["fp8"] == shapes["bf16"]
    layers, _ = read_lora(files["fp8"])
    source = make_config().source_checkpoint
    merged = merge_lora(source, files["fp8"], tmp_path / "merged.safetensors", dtype="fp32",
                        tokenizer_dir=make_config().tokenizer_dir, config_dir=make_config().model_config_dir)
    assert merged.layers == len(layers)
    before, after = read_tensors(Path(source)), read_tensors(merged.path)
    unet = [k for k in after if k.startswith("model.diffusion_model.") and k.endswith("weight")]
    assert 0 < sum(not torch.equal(after[k], before[k].float()) for k in unet) <= len(layers)
    # previews rendered with the fp8 base and the adapters
    previews = [p for e in runs["fp8"][1] if e["event"] == "sample" for p in e["paths"]]
    assert len(previews) == 1
    started = next(e for e in runs["fp8"][1] if e["event"] == "started")
    assert started["weights"] == "bfloat16"


def test_sdxl_text_encoders_that_train_keep_their_frozen_weights_in_fp8_too(make_config, tiny_sdxl, tmp_path,
                                                                             monkeypatch):
    """Text encoders that stay on the device for the steps (here both train) hold their frozen weights in float8
    beside their adapters, as the UNet does; both learn."""
    seen = {}
    original = engine.train

    def inspect(run_):
        for name, model in {"unet": run_.components.unet, **run_.components.text_encoders}.items():
            base = [p for n, p in model.named_parameters() if "lora_" not in n and p.dim() == 2]
            seen[name] = sum(is_fp8(p) for p in base) / len(base)
        return original(run_)

    monkeypatch.setattr(engine, "train", inspect)
    config = _lora_config(make_config, source_checkpoint=str(tiny_sdxl.path),
                          model_config_dir=str(tiny_sdxl.config_dir), max_steps=2, prior_preservation=False,
                          lora_base_precision="fp8", train_text_encoder=True, text_encoder_lr=1e-2,
                          train_text_encoder_2=True, text_encoder_2_lr=1e-2)
    result = run(config, tmp_path / "zwx", Events())
    assert set(seen) == {"unet", "text_encoder", "text_encoder_2"}
    assert all(share > 0.8 for share in seen.values()), seen  # the 2-D weights but the embeddings
    layers, _ = read_lora(result.checkpoints[-1])
    assert {stem.split("_")[1] for stem in layers} == {"unet", "te1", "te2"}
    assert all(layer.up.abs().max() > 0 for layer in layers.values())
