"""Bad input through the engine: a clear error naming the thing and what to do, and nothing written."""

from __future__ import annotations

import math
import pickle
import re

import pytest
import torch
from safetensors.torch import save_file

from dreambooth.config import ConfigError
from dreambooth.engine import run
from dreambooth.errors import DatasetError, ModelFormatError
from dreambooth.models.read import read_tensors


def _error_event(events):
    errors = [e for e in events.collected if e["event"] == "error"]
    assert len(errors) == 1
    return errors[0]


def _nothing_written(model_dir):
    return not (model_dir / "checkpoints").exists() and not list(model_dir.rglob("*.safetensors"))


@pytest.mark.parametrize(
    "content,expect",
    [
        (b"", "is empty (0 bytes)"),
        (b"this is a text file, not a model", "is not a readable checkpoint"),
    ],
)
def test_a_checkpoint_that_is_not_a_model_is_refused_by_name(tmp_path, make_config, model_dir, events, content, expect):
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(content)
    with pytest.raises(ModelFormatError) as error:
        run(make_config(source_checkpoint=str(bogus)), model_dir, events)
    assert str(bogus) in str(error.value) and expect in str(error.value)
    assert _error_event(events)["message"] == error.value.message
    assert _nothing_written(model_dir)


def test_a_safetensors_file_of_something_else_is_refused(tmp_path, make_config, model_dir, events):
    other = tmp_path / "embedding.safetensors"
    save_file({"emb_params": torch.zeros(2, 768)}, str(other))
    with pytest.raises(ModelFormatError, match="not a Stable Diffusion checkpoint"):
        run(make_config(source_checkpoint=str(other)), model_dir, events)
    assert _nothing_written(model_dir)


def test_a_missing_checkpoint_says_so(tmp_path, make_config, model_dir, events):
    with pytest.raises(ModelFormatError, match="does not exist"):
        run(make_config(source_checkpoint=str(tmp_path / "nope.safetensors")), model_dir, events)


UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
SD1_TEXT = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
SD1 = {UNET_IN: (320, 4, 3, 3), SD1_TEXT: (49408, 768), "first_stage_model.decoder.conv_in.weight": (512, 4, 3, 3)}


@pytest.mark.parametrize(
    "shapes,what,advice",
    [
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}, "a LoRA", "checkpoint it was"),
        ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": (3072, 4)}, "a LoRA", "Lora tab"),
        ({"unet.down_blocks.0.attentions.0.to_q.lora_A.weight": (4, 320)}, "a LoRA", "Lora tab"),
        ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (4608, 1536)}, "Stable Diffusion 3",
         "SD 1.x, SD 2.x or SDXL"),
        ({"double_blocks.0.img_attn.qkv.weight": (9216, 3072)}, "Flux", "SD 1.x, SD 2.x or SDXL"),
        ({"model.diffusion_model.input_blocks.1.0.time_stack.in_layers.0.weight": (320,), **SD1},
         "Stable Video Diffusion", "SDXL"),
        ({**SD1, UNET_IN: (320, 9, 3, 3)}, "inpainting model .its UNet takes 9", "plain .text-to-image. version"),
        ({"conditioner.embedders.0.model.ln_final.weight": (1280,), UNET_IN: (384, 4, 3, 3)}, "SDXL refiner",
         "SDXL base"),
        ({"text_model.encoder.layers.0.mlp.fc1.weight": (3072, 768)}, "a text encoder alone", "full"),
        ({"transformer.resblocks.0.attn.in_proj_weight": (3072, 1024)}, "a text encoder alone", "full"),
        ({"encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3)}, "a VAE alone", "full"),
        ({"down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3), "conv_in.weight": (320, 4, 3, 3)},
         "diffusers UNet alone", "model_index.json"),
        ({UNET_IN: (320, 4, 3, 3), SD1_TEXT: (49408, 768)}, "SD 1.x but has no VAE", "complete checkpoint"),
        ({UNET_IN: (320, 4, 3, 3), "first_stage_model.decoder.conv_in.weight": (512, 4, 3, 3)},
         "no text encoder of a known family", "complete checkpoint"),
    ],
)
def test_what_no_family_trains_is_refused_naming_what_it_is(tmp_path, shapes, what, advice):
    from dreambooth.models.families import identify_single_file

    with pytest.raises(ModelFormatError, match=what) as error:
        identify_single_file(shapes, tmp_path / "x.safetensors")
    assert re.search(advice, error.value.advice)


@pytest.mark.parametrize(
    "shapes,family",
    [
        (SD1, "sd1"),
        ({UNET_IN: (320, 4, 3, 3), "cond_stage_model.model.token_embedding.weight": (49408, 1024),
          "first_stage_model.decoder.conv_in.weight": (512, 4, 3, 3)}, "sd2"),
        ({UNET_IN: (320, 4, 3, 3), "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
          "conditioner.embedders.1.model.ln_final.weight": (1280,),
          "first_stage_model.decoder.conv_in.weight": (512, 4, 3, 3)}, "sdxl"),
    ],
)
def test_each_family_is_recognised_by_its_keys(tmp_path, shapes, family):
    from dreambooth.models.families import identify_single_file

    assert identify_single_file(shapes, tmp_path / "x.safetensors").name == family


def test_a_lora_picked_as_the_source_is_refused_before_anything_is_written(tmp_path, make_config, model_dir, events):
    from safetensors.torch import save_file

    lora = tmp_path / "zwx-lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}, str(lora))
    with pytest.raises(ModelFormatError, match="is a LoRA"):
        run(make_config(source_checkpoint=str(lora), model_config_dir=""), model_dir, events)
    assert "LoRA" in _error_event(events)["message"]
    assert _nothing_written(model_dir)


def test_old_ckpt_with_pickled_lightning_callbacks_is_read_without_running_code(tmp_path, tiny, monkeypatch):
    import sys
    import types

    class ModelCheckpoint:
        pass

    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = names[-1], "ModelCheckpoint"
    sys.modules[names[-1]].ModelCheckpoint = ModelCheckpoint
    tensors = read_tensors(tiny.path)
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": tensors, "callbacks": {"cb": ModelCheckpoint()}, "global_step": 5}, str(path))
    for name in names:
        monkeypatch.delitem(sys.modules, name)
    back = read_tensors(path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in back)


def test_a_ckpt_that_would_run_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": {"x": Evil()}}, handle)
    with pytest.raises(ModelFormatError, match="evil.ckpt"):
        read_tensors(path)


def test_missing_and_empty_instance_folders(tmp_path, make_config, model_dir, events):
    with pytest.raises(DatasetError, match="does not exist|not found|missing"):
        run(make_config(concept={"instance_dir": str(tmp_path / "nowhere")}), model_dir, events)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="empty"):
        run(make_config(concept={"instance_dir": str(empty)}), model_dir, events)
    assert _nothing_written(model_dir)


def test_a_broken_photo_stops_the_run_before_anything_is_loaded(make_config, model_dir, events, instance_dir):
    broken = instance_dir / "zwx_broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(DatasetError) as error:
        run(make_config(), model_dir, events)
    assert "zwx_broken.jpg" in str(error.value)
    assert not (model_dir / "cache").exists()  # the model was never loaded (its tokenizer is rebuilt there first)


def test_class_folder_equal_to_instance_folder_is_an_error(make_config, model_dir, events, instance_dir):
    with pytest.raises(ConfigError, match="class_dir' is the instance folder"):
        run(make_config(concept={"class_dir": str(instance_dir)}), model_dir, events)


def test_an_instance_prompt_without_a_rare_token_warns(make_config, model_dir, events):
    run(make_config(max_steps=1, concept={"instance_prompt": "photo of a disc"}), model_dir, events)
    warnings = [e["message"] for e in events.collected if e["event"] == "warning"]
    assert any("rare token" in w for w in warnings)


def test_an_8x8_photo_is_rejected_with_the_minimum(make_config, model_dir, events, instance_dir):
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(instance_dir / "tiny.png")
    with pytest.raises(DatasetError, match=r"tiny\.png.*8x8.*64"):
        run(make_config(), model_dir, events)


def test_a_full_disk_while_saving_leaves_no_partial_file_and_says_what_to_do(
    make_config, model_dir, events, monkeypatch
):
    import errno

    from dreambooth.errors import DiskFullError
    from dreambooth.models import export

    real_write = export.write_safetensors

    def full_disk(filename, tensors, metadata=None):
        if "checkpoints" not in str(filename):
            return real_write(filename, tensors, metadata)
        with open(filename, "wb") as handle:
            handle.write(b"\0" * 1000)  # half a file, then the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "write_safetensors", full_disk)
    with pytest.raises(DiskFullError) as error:
        run(make_config(max_steps=2, save_every=1), model_dir, events)
    assert "zwx_1.safetensors" in str(error.value) and "Free some space" in error.value.advice
    assert _error_event(events)["kind"] == "DiskFullError"
    assert [p for p in (model_dir / "checkpoints").iterdir() if p.is_file()] == []  # nor the yaml of the failed save


def test_out_of_memory_becomes_advice(make_config, model_dir, events, monkeypatch):
    from diffusers import UNet2DConditionModel

    from dreambooth.errors import OutOfMemoryAdvice

    def oom(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(UNet2DConditionModel, "forward", oom)
    with pytest.raises(OutOfMemoryAdvice):
        run(make_config(max_steps=1), model_dir, events)
    error = _error_event(events)
    assert error["kind"] == "OutOfMemoryAdvice" and "gradient checkpointing" in error["advice"]
    assert not (model_dir / "checkpoints").exists()


def test_adamw_8bit_without_a_usable_bitsandbytes_says_what_to_do(make_config, model_dir, events):
    with pytest.raises(ConfigError, match="bitsandbytes") as error:  # fp32 weights: torch's optimizer path
        run(make_config(optimizer="adamw_8bit", weights_dtype="fp32"), model_dir, events)
    assert "pick adamw" in error.value.advice
    assert not (model_dir / "checkpoints").exists()


def test_adamw_8bit_on_bf16_weights_runs_its_own_kernel_without_bitsandbytes(make_config, model_dir, events):
    result = run(make_config(optimizer="adamw_8bit", weights_dtype="bf16", max_steps=2), model_dir, events)
    started = next(e for e in events.collected if e["event"] == "started")
    assert started["optimizer"] == "FlatAdamW8bit"
    assert len(result.losses) == 2 and all(math.isfinite(v) for v in result.losses)
    assert result.checkpoints[-1].is_file()
