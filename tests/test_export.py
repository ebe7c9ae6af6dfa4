"""models/export.py against an oracle we did not write: diffusers' own single-file loader."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from dreambooth.models.export import SAVE_DTYPES, checkpoint_tensors, modelspec, save_checkpoint
from dreambooth.models.load import DROPPED_PREFIXES, load_model
from dreambooth.models.read import read_tensors


def _diffusers_reads_back(path, config_dir, tokenizer):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_single_file(
        str(path),
        config=str(config_dir),
        local_files_only=True,
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
    )


def _flat(state_dict):
    """transformers 5 flattened CLIPTextModel's names; compare on the un-prefixed names."""
    return {k.removeprefix("text_model."): v for k, v in state_dict.items() if not k.endswith("position_ids")}


@pytest.mark.parametrize(
    "fmt,dtype", [("safetensors", "fp16"), ("safetensors", "bf16"), ("safetensors", "fp32"), ("ckpt", "fp16")]
)
def test_diffusers_reads_our_export_back_bit_for_bit(tmp_path, tiny, fmt, dtype):
    components = copy.deepcopy(tiny.components)
    with torch.no_grad():  # make the weights distinguishable from any fresh initialisation
        for p in components.unet.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = save_checkpoint(tmp_path / f"out.{fmt}", checkpoint_tensors(components, None, SAVE_DTYPES[dtype]))
    readable = path
    if fmt == "ckpt":  # diffusers reads .ckpt with weights_only; hand it the same tensors as safetensors
        readable = save_checkpoint(tmp_path / "ckpt.safetensors", read_tensors(path))
    pipe = _diffusers_reads_back(readable, tiny.config_dir, components.tokenizer)
    for name in ("unet", "vae", "text_encoder"):
        ours = _flat(getattr(components, name).state_dict())
        theirs = _flat(getattr(pipe, name).state_dict())
        assert ours.keys() == theirs.keys(), name
        for key, value in ours.items():
            expected = value.to(SAVE_DTYPES[dtype])
            got = theirs[key].reshape(expected.shape).to(SAVE_DTYPES[dtype])
            assert torch.equal(got, expected), f"{name}.{key}"


def test_export_of_an_untouched_source_gives_back_every_tensor(tmp_path, tiny):
    loaded = load_model(tiny.path, cache_dir=tmp_path / "cache", config_dir=str(tiny.config_dir))
    out = save_checkpoint(tmp_path / "again.safetensors", checkpoint_tensors(loaded.components, loaded.extra_tensors))
    source, exported = read_tensors(tiny.path), read_tensors(out)
    dropped = {k for k in source if k.startswith(DROPPED_PREFIXES)}
    assert dropped == {"model_ema.decay", "model_ema.num_updates"}  # the only keys left out, by design
    assert set(exported) == set(source) - dropped
    for key in exported:
        assert exported[key].dtype == source[key].dtype, key
        assert torch.equal(exported[key], source[key]), key


def test_an_fp16_source_loads_to_the_same_fp32_master_weights(tmp_path, tiny):
    tensors = read_tensors(tiny.path)
    half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    source = save_checkpoint(tmp_path / "tiny-fp16.safetensors", half)
    loaded = load_model(source, cache_dir=tmp_path / "cache", config_dir=str(tiny.config_dir))
    assert {p.dtype for p in loaded.components.unet.parameters()} == {torch.float32}  # fp32 master weights
    exported = checkpoint_tensors(loaded.components)
    assert all(torch.equal(exported[k], half[k].float()) for k in exported if k in half)  # nothing lost on the way


def test_safetensors_header_carries_modelspec_and_training_summary(tmp_path, tiny):
    meta = modelspec("sd1", "epsilon", 512, "zwx (step 10)", {"step": 10, "instance_prompts": ["photo of zwx"]})
    path = save_checkpoint(tmp_path / "m.safetensors", checkpoint_tensors(tiny.components), meta)
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
    assert header["modelspec.architecture"] == "stable-diffusion-v1"
    assert header["modelspec.prediction_type"] == "epsilon"
    assert header["modelspec.resolution"] == "512x512"
    assert header["modelspec.title"] == "zwx (step 10)"
    assert json.loads(header["dreambooth.training"])["step"] == 10
    v_meta = modelspec("sd1", "v_prediction", 768, "v", None)
    assert v_meta["modelspec.prediction_type"] == "v" and "dreambooth.training" not in v_meta


def test_a_failed_write_leaves_no_file_with_the_final_name(tmp_path, tiny, monkeypatch):
    from dreambooth.models import export

    def crash_half_way(filename, tensors, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\0" * 4096)
        raise RuntimeError("power cut")

    monkeypatch.setattr(export, "write_safetensors", crash_half_way)
    with pytest.raises(RuntimeError, match="power cut"):
        save_checkpoint(tmp_path / "m.safetensors", checkpoint_tensors(tiny.components))
    assert list(tmp_path.iterdir()) == []
