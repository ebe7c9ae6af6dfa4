"""Every option changes something a test can observe: the loss, the learning rates, the optimizer, the weights,
the saved files, the class images or the previews. An option that changes nothing does not exist.

Each case runs two short trainings on the tiny model, the baseline and one option changed, and names what
must differ. ``test_every_option_is_covered`` fails when a new option has no case here.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from dreambooth.config import Concept, ConfigError, TrainConfig, option_specs
from dreambooth.data import cache as cache_module
from dreambooth.engine import run
from dreambooth.events import Events
from dreambooth.models.read import read_tensors

BASE = {"max_steps": 2, "sample_every": 2, "sample_steps": 2, "save_every": 0}
BASE_CONCEPT = {"num_class_images": 1, "class_infer_steps": 2, "sample_prompts": ["zwx disc"]}


def _digest(paths) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(Path(p).read_bytes())
    return h.hexdigest()


def observe(make_config, work: Path, monkeypatch, concept=None, **options) -> dict:
    """Train briefly and record everything an option might change."""
    config = make_config(concept={**BASE_CONCEPT, **(concept or {})}, **{**BASE, **options})
    model_dir = work / "zwx"
    for leftover in ("state", "checkpoints", "samples", "cache", "class_images"):
        shutil.rmtree(model_dir / leftover, ignore_errors=True)
    calls = {"prompts": 0}
    original = cache_module.PromptEmbeddings._encode

    def counting(self, prompts):
        calls["prompts"] += 1
        return original(self, prompts)

    monkeypatch.setattr(cache_module.PromptEmbeddings, "_encode", counting)
    seen: list[dict] = []
    result = run(config, model_dir, Events(on_event=seen.append))
    checkpoint = result.checkpoints[-1]
    tensors = read_tensors(checkpoint)
    unet_key = "model.diffusion_model.out.2.weight"
    te_key = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    started = next(e for e in seen if e["event"] == "started")
    return {
        "loss": [e["loss"] for e in seen if e["event"] == "step"],
        "lr": [e["lr"] for e in seen if e["event"] == "step"],
        "steps": result.step,
        "unet": tensors[unet_key].float().sum().item() + tensors[unet_key].float().abs().max().item(),
        "text_encoder": tensors[te_key].float().sum().item(),
        "file": (checkpoint.parent, checkpoint.name),
        "files": [p.name for p in result.checkpoints],
        "latent_cache_files": len(list((model_dir / "cache" / "latents").glob("*.safetensors"))),
        "dtype": tensors[unet_key].dtype,
        "class_images": _digest((model_dir / "class_images").rglob("*.png")),
        "samples": _digest(p for e in seen if e["event"] == "sample" for p in e["paths"]),
        "sample_count": sum(len(e["paths"]) for e in seen if e["event"] == "sample"),
        "states": sorted(p.name for p in (model_dir / "state").glob("step_*")),
        "prompt_encodes": calls["prompts"],
        "started": {
            k: started[k]
            for k in ("optimizer", "precision", "weights", "attention", "gradient_checkpointing", "channels_last")
        },
        "warnings": [e["message"] for e in seen if e["event"] == "warning"],
    }


# option -> (changed value(s), what must differ, [the reference run's settings if not the baseline])
CASES: dict[str, tuple] = {
    "model_name": ({"model_name": "other"}, "file"),
    "output_dir": ({"output_dir": "<tmp>/elsewhere"}, "file"),
    "resolution": ({"resolution": 128}, "loss"),
    "center_crop": ({"center_crop": False}, "loss"),
    "hflip": ({"hflip": True}, "loss"),
    "max_steps": ({"max_steps": 3}, "steps"),
    "epochs": ({"epochs": 2}, "steps"),
    "batch_size": ({"batch_size": 2}, "loss"),
    "gradient_accumulation": ({"gradient_accumulation": 2}, "unet"),
    "learning_rate": ({"learning_rate": 1e-2}, "unet"),
    "lr_scheduler": ({"lr_scheduler": "linear"}, "lr"),
    "lr_warmup_steps": ({"lr_warmup_steps": 2}, "lr", {"lr_scheduler": "constant_with_warmup"}),
    "lr_cycles": ({"lr_cycles": 2}, "lr", {"lr_scheduler": "cosine_with_restarts", "max_steps": 4}),
    "lr_power": ({"lr_power": 3.0}, "lr", {"lr_scheduler": "polynomial", "max_steps": 3}),
    "train_text_encoder": ({"train_text_encoder": True, "text_encoder_lr": 1e-3}, "text_encoder"),
    "text_encoder_lr": (
        {"text_encoder_lr": 1e-2},
        "text_encoder",
        {"train_text_encoder": True, "text_encoder_lr": 1e-3},
    ),
    "text_encoder_stop": (
        {"text_encoder_stop": 0.0},
        "text_encoder",
        {"train_text_encoder": True, "text_encoder_lr": 1e-3},
    ),
    "optimizer": ({"optimizer": "adafactor"}, "started"),
    "adam_beta1": ({"adam_beta1": 0.5}, "unet"),
    "adam_beta2": ({"adam_beta2": 0.5}, "unet"),
    "adam_epsilon": ({"adam_epsilon": 0.5}, "unet"),
    "weight_decay": ({"weight_decay": 0.9}, "unet"),
    "max_grad_norm": ({"max_grad_norm": 1e-4}, "unet"),
    "mixed_precision": ({"mixed_precision": "bf16"}, "started"),
    "attention": ({"attention": "eager"}, "started"),
    "gradient_checkpointing": ({"gradient_checkpointing": True}, "started"),
    "weights_dtype": ({"weights_dtype": "bf16"}, "started"),
    "optimizer_in_backward": ({"optimizer_in_backward": True}, "started"),
    "cache_latents": ({"cache_latents": False}, "latent_cache_files"),
    "cache_text_embeddings": ({"cache_text_embeddings": False}, "prompt_encodes"),
    "prior_preservation": ({"prior_preservation": False}, "loss"),
    "prior_loss_weight": ({"prior_loss_weight": 5.0}, "loss"),
    "offset_noise": ({"offset_noise": 0.5}, "loss"),
    "min_snr_gamma": ({"min_snr_gamma": 0.05}, "loss"),
    "seed": ({"seed": 7}, "loss"),
    "save_every": ({"save_every": 1}, "files"),
    "save_format": ({"save_format": "ckpt"}, "file"),
    "save_dtype": ({"save_dtype": "fp16"}, "dtype"),
    "state_every": ({"state_every": 1}, "states"),
    "keep_states": ({"keep_states": 2}, "states", {"state_every": 1}),
    "sample_every": ({"sample_every": 1}, "sample_count"),
    "sample_negative_prompt": ({"sample_negative_prompt": "blurry"}, "samples"),
    "sample_guidance_scale": ({"sample_guidance_scale": 2.0}, "samples"),
    "sample_steps": ({"sample_steps": 3}, "samples"),
    "sample_seed": ({"sample_seed": 5}, "samples"),
    "concepts.instance_prompt": ({"concept": {"instance_prompt": "a zwx thing"}}, "loss"),
    "concepts.class_prompt": ({"concept": {"class_prompt": "a photo of a ball"}}, "class_images"),
    "concepts.num_class_images": ({"concept": {"num_class_images": 2}}, "class_images"),
    "concepts.class_negative_prompt": ({"concept": {"class_negative_prompt": "blurry"}}, "class_images"),
    "concepts.class_guidance_scale": ({"concept": {"class_guidance_scale": 1.0}}, "class_images"),
    "concepts.class_infer_steps": ({"concept": {"class_infer_steps": 3}}, "class_images"),
    "concepts.class_seed": ({"concept": {"class_seed": 9}}, "class_images"),
    "concepts.sample_prompts": ({"concept": {"sample_prompts": ["zwx disc", "a disc"]}}, "sample_count"),
}
# Options observed elsewhere (the test that does is named), or that select the inputs themselves.
ELSEWHERE = {
    "version": "test_config.py::test_old_versions_are_migrated",
    "source_checkpoint": "test_bad_input.py (every checkpoint case)",
    "tokenizer_dir": "test_options.py::test_tokenizer_and_config_folders_are_used",
    "model_config_dir": "test_options.py::test_tokenizer_and_config_folders_are_used",
    "device": "test_options.py::test_device_cuda_without_a_gpu_is_refused",
    "log_every": "test_options.py::test_log_every_batches_the_step_events",
    "cuda_graphs": "CUDA only: bench/ measures it on the GPU (the started event reports whether it ran)",
    "compile_optimizer": "CUDA + Triton only: bench/ measures it on the GPU",
    "channels_last": "CUDA only (the CPU keeps NCHW): test_speed_layout.py::uses_channels_last; bench/ on the GPU",
    "prediction_type": "test_families.py::test_sd2_prediction_type_the_header_the_user_or_the_web_uis_test",
    "train_text_encoder_2": "test_families.py::test_sdxl_resume_continues_bit_for_bit (only the second one moves)",
    "text_encoder_2_lr": "test_families.py::test_sdxl_second_text_encoder_learning_rate",
    "compile_unet": "test_compile_unet.py (the started event's compiled_blocks; the losses)",
    "method": "test_lora.py::test_a_lora_run_writes_the_web_uis_layout_and_trains_only_the_adapters",
    "lora_rank": "test_lora.py::test_rank_and_alpha_set_the_adapters_shape_and_strength",
    "lora_alpha": "test_lora.py::test_rank_and_alpha_set_the_adapters_shape_and_strength",
    "lora_layers": "test_lora.py::test_lora_layers_picks_the_unet_layers_that_get_adapters",
    "lora_base_precision": "test_lora_memory.py::test_a_lora_run_on_fp8_base_weights_learns_like_one_on_bf16 (the "
    "losses, step by step; the stored bytes: test_the_tiny_unet_in_float8_with_adapters_and_checkpointing_…)",
    "concepts": "test_train.py",
    "concepts.instance_dir": "test_bad_input.py::test_missing_and_empty_instance_folders",
    "concepts.class_dir": "test_train.py::test_user_class_images_count_towards_the_total",
    "aspect_buckets": "test_buckets.py::test_buckets_change_what_photos_of_other_shapes_train_on (the conftest "
    "photos are nearly square: at 64 px their bucket is the square)",
}


def test_every_option_is_covered():
    names = {s.name for s in option_specs(TrainConfig)} | {f"concepts.{s.name}" for s in option_specs(Concept)}
    assert names - set(CASES) - set(ELSEWHERE) == set()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("options")


_BASELINES: dict[str, dict] = {}


@pytest.mark.parametrize("option", sorted(CASES))
def test_option_changes_what_it_should(option, make_config, work, monkeypatch, tmp_path):
    changes, observable, *reference = CASES[option]
    reference = reference[0] if reference else {}
    key = repr(sorted(reference.items()))
    if key not in _BASELINES:
        _BASELINES[key] = observe(make_config, work, monkeypatch, **reference)
    changes = {k: (v.replace("<tmp>", str(tmp_path)) if isinstance(v, str) else v) for k, v in changes.items()}
    changed = observe(make_config, work, monkeypatch, **{**reference, **changes})
    assert changed[observable] != _BASELINES[key][observable], f"{option} did not change {observable}"


def test_tokenizer_and_config_folders_are_used(make_config, tmp_path, model_dir):
    from dreambooth.errors import ModelFormatError

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFormatError, match="Tokenizer folder"):
        run(make_config(tokenizer_dir=str(empty)), model_dir, Events())
    with pytest.raises(ModelFormatError, match="model_config_dir|config folder"):
        run(make_config(model_config_dir=""), tmp_path / "m2" / "zwx", Events())  # SD1 full-size config: no fit


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_device_cuda_without_a_gpu_is_refused(make_config, model_dir):
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        run(make_config(device="cuda"), model_dir, Events())


def test_log_every_batches_the_step_events(make_config, tmp_path):
    """A listener that asks to cancel on the first step event it sees stops the run at step 1 when every step is
    reported, and only after the 3rd step when steps are reported three at a time."""
    steps = {}
    for every in (1, 3):
        model_dir = tmp_path / str(every) / "zwx"

        def cancel_on_first_step(event, model_dir=model_dir):
            if event["event"] == "step":
                (model_dir / "cancel.request").touch()

        result = run(make_config(max_steps=6, log_every=every), model_dir, Events(on_event=cancel_on_first_step))
        steps[every] = result.step
    assert steps == {1: 1, 3: 3}


def test_bf16_weights_learn_through_stochastic_rounding_and_resume_exactly(make_config, tmp_path):
    from dreambooth.events import CANCEL_FILE

    config = make_config(max_steps=4, weights_dtype="bf16", optimizer_in_backward=True, learning_rate=1e-4)
    straight = run(config, tmp_path / "a" / "zwx", Events())
    stopped_dir = tmp_path / "b" / "zwx"

    def stop_at_2(event):
        if event["event"] == "step" and event["step"] == 2:
            (stopped_dir / CANCEL_FILE).touch()

    assert run(config, stopped_dir, Events(on_event=stop_at_2)).step == 2
    resumed = run(config, stopped_dir, Events())
    a, b = read_tensors(straight.checkpoints[-1]), read_tensors(resumed.checkpoints[-1])
    assert all(torch.equal(a[k], b[k]) for k in a)
    source = read_tensors(Path(config.source_checkpoint))
    unet = [k for k in a if k.startswith("model.diffusion_model.")]
    # lr 1e-4 moves a weight by far less than half a bf16 step: only stochastic rounding lets them change
    assert sum(not torch.equal(a[k].bfloat16(), source[k].bfloat16()) for k in unet) > 0.9 * len(unet)
