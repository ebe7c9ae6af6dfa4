"""models/export.py against an oracle we did not write: diffusers' own single-file loader."""

from __future__ import annotations

import copy
import json
import shutil

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
    loaded = load_model(tiny.path, tmp_path / "working", tmp_path / "cache", config_dir=str(tiny.config_dir))
    out = save_checkpoint(tmp_path / "again.safetensors", checkpoint_tensors(loaded.components, loaded.extra_tensors))
    source, exported = read_tensors(tiny.path), read_tensors(out)
    dropped = {k for k in source if k.startswith(DROPPED_PREFIXES)}
    assert dropped == {"model_ema.decay", "model_ema.num_updates"}  # the only keys left out, by design
    assert set(exported) == set(source) - dropped
    for key in exported:
        assert exported[key].dtype == source[key].dtype, key
        assert torch.equal(exported[key], source[key]), key


def test_the_working_copy_is_reused_and_gives_the_same_model(tmp_path, tiny):
    first = load_model(tiny.path, tmp_path / "working", tmp_path / "cache", config_dir=str(tiny.config_dir))
    stamp = (tmp_path / "working" / "source.json").stat().st_mtime_ns
    second = load_model(tiny.path, tmp_path / "working", tmp_path / "cache", config_dir=str(tiny.config_dir))
    assert (tmp_path / "working" / "source.json").stat().st_mtime_ns == stamp
    a, b = (
        checkpoint_tensors(first.components, first.extra_tensors),
        checkpoint_tensors(second.components, second.extra_tensors),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _working_bytes(folder) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.suffix in (".safetensors", ".bin"))


def test_an_fp16_source_keeps_an_fp16_working_copy_that_loads_to_the_same_fp32_model(tmp_path, tiny):
    tensors = read_tensors(tiny.path)
    half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    source = save_checkpoint(tmp_path / "tiny-fp16.safetensors", half)
    fresh = load_model(source, tmp_path / "w16", tmp_path / "cache", config_dir=str(tiny.config_dir))
    reused = load_model(source, tmp_path / "w16", tmp_path / "cache", config_dir=str(tiny.config_dir))
    load_model(tiny.path, tmp_path / "w32", tmp_path / "cache", config_dir=str(tiny.config_dir))
    assert _working_bytes(tmp_path / "w16") < 0.55 * _working_bytes(tmp_path / "w32")
    for loaded in (fresh, reused):
        assert {p.dtype for p in loaded.components.unet.parameters()} == {torch.float32}  # fp32 master weights
    a, b = checkpoint_tensors(fresh.components), checkpoint_tensors(reused.components)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], half[k].float()) for k in a if k in half)  # nothing lost on the way


def test_a_working_copy_of_an_older_format_is_rebuilt_once(tmp_path, tiny):
    """Versions before per-part precision wrote every working copy in fp32; such a copy of an fp16 source is
    rebuilt (half the disk) rather than reused for ever."""
    tensors = read_tensors(tiny.path)
    half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    source = save_checkpoint(tmp_path / "tiny-fp16.safetensors", half)
    load_model(source, tmp_path / "w", tmp_path / "cache", config_dir=str(tiny.config_dir))
    stamp_path = tmp_path / "w" / "source.json"
    new_bytes = _working_bytes(tmp_path / "w")
    stamp = json.loads(stamp_path.read_text())
    del stamp["working_format"]  # what an older version left: fp32 parts and no format in the stamp
    load_model(tiny.path, tmp_path / "old", tmp_path / "cache", config_dir=str(tiny.config_dir))
    old_copy = tmp_path / "w-old"
    shutil.copytree(tmp_path / "old", old_copy)
    (old_copy / "source.json").write_text(json.dumps(stamp))
    old_bytes = _working_bytes(old_copy)
    assert old_bytes > 1.8 * new_bytes
    reloaded = load_model(source, old_copy, tmp_path / "cache", config_dir=str(tiny.config_dir))
    assert _working_bytes(old_copy) < 0.55 * old_bytes
    assert json.loads((old_copy / "source.json").read_text()) == json.loads(stamp_path.read_text())
    a = checkpoint_tensors(reloaded.components)
    assert all(torch.equal(a[k], half[k].float()) for k in a if k in half)


def test_each_part_keeps_its_own_precision_and_position_ids_do_not_count(tmp_path, tiny):
    """A common mix: fp16 UNet and text encoder, a baked-in fp32 VAE, position_ids stored as floats."""
    tensors = read_tensors(tiny.path)
    mixed = {k: v.half() if v.is_floating_point() and not k.startswith("first_stage_model.") else v
             for k, v in tensors.items()}
    position_ids = next(k for k in mixed if k.endswith("position_ids"))
    mixed[position_ids] = mixed[position_ids].float()
    source = save_checkpoint(tmp_path / "mixed.safetensors", mixed)
    load_model(source, tmp_path / "w", tmp_path / "cache", config_dir=str(tiny.config_dir))
    stored = {}
    for part in ("unet", "vae", "text_encoder"):
        folder = tmp_path / "w" / part
        values = read_tensors(next(folder.glob("*.safetensors"), None) or next(folder.glob("*.bin")))
        stored[part] = {v.dtype for k, v in values.items() if v.is_floating_point() and "position_ids" not in k}
    assert stored == {"unet": {torch.float16}, "vae": {torch.float32}, "text_encoder": {torch.float16}}


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
    import safetensors.torch

    def crash_half_way(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\0" * 4096)
        raise RuntimeError("power cut")

    monkeypatch.setattr(safetensors.torch, "save_file", crash_half_way)
    with pytest.raises(RuntimeError, match="power cut"):
        save_checkpoint(tmp_path / "m.safetensors", checkpoint_tensors(tiny.components))
    assert list(tmp_path.iterdir()) == []
