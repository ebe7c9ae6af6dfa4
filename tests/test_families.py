"""SD 2.x and SDXL end to end on tiny models: single file in, train a few steps, export, and diffusers' own
single-file loader reads back exactly the trained tensors; resume is bitwise; conditioning is the family's."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors import safe_open

from dreambooth.config import TrainConfig
from dreambooth.engine import run
from dreambooth.models.components import Components
from dreambooth.models.families import family_named
from dreambooth.models.read import read_tensors


def _config(make_config, tiny, **options) -> TrainConfig:
    """conftest's tiny-run config, on this family's tiny model."""
    return make_config(source_checkpoint=str(tiny.path), model_config_dir=str(tiny.config_dir), **options)


def _diffusers_reads(path, config_dir, family: str, tokenizer_dir):
    import diffusers

    from dreambooth.models.tokenizer import load_clip_tokenizer

    fam = family_named(family)
    tokenizers = {name: load_clip_tokenizer(tokenizer_dir, pad) for name, pad in fam.pad_tokens.items()}
    return getattr(diffusers, fam.pipeline_class).from_single_file(
        str(path), config=str(config_dir), local_files_only=True, **tokenizers, **fam.pipeline_extras()
    )


@pytest.mark.parametrize("family", ["sdxl", "sd2"])
def test_train_export_and_diffusers_reads_back_the_trained_tensors(make_config,
    family, tiny_sdxl, tiny_sd2, tokenizer_dir, instance_dir, tmp_path, events
):
    tiny = {"sdxl": tiny_sdxl, "sd2": tiny_sd2}[family]
    config = _config(make_config, tiny, train_text_encoder=True, train_text_encoder_2=True)
    result = run(config, tmp_path / "zwx", events)
    assert not result.cancelled and len(result.checkpoints) == 1
    assert all(torch.isfinite(torch.tensor(loss)) for loss in result.losses)
    before, after = read_tensors(tiny.path), read_tensors(result.checkpoints[0])
    # training moved the UNet and every text encoder
    moved = {k for k in before if not torch.equal(before[k].float(), after[k].float())}
    prefixes = {"sdxl": ("model.diffusion_model.", "conditioner.embedders.0.", "conditioner.embedders.1."),
                "sd2": ("model.diffusion_model.", "cond_stage_model.model.")}[family]
    assert all(any(k.startswith(p) for k in moved) for p in prefixes)
    assert not any(k.startswith("first_stage_model.") for k in moved)
    # every tensor of the source is in the export, with its shape; what diffusers' own loader reads from the export,
    # written again by our exporter, is the export itself: diffusers read exactly the tensors we trained
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    pipe = _diffusers_reads(result.checkpoints[0], tiny.config_dir, family, tokenizer_dir)
    fam = family_named(family)
    components = Components(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=None,
                            scheduler=pipe.scheduler, text_encoder_2=getattr(pipe, "text_encoder_2", None))
    reread = fam.export_tensors(components)
    assert reread.keys() <= after.keys()
    for key, value in reread.items():
        assert torch.equal(value.float(), after[key].float()), key
    header = safe_open(str(result.checkpoints[0]), framework="pt").metadata()
    expected = {"sdxl": "stable-diffusion-xl-v1-base", "sd2": "stable-diffusion-v2-768-v"}[family]
    assert header["modelspec.architecture"] == expected
    assert not result.checkpoints[0].with_suffix(".yaml").exists()
    warnings = [e["message"] for e in events.collected if e["event"] == "warning"]
    assert any("gets no .yaml" in w and "released shape" in w for w in warnings)


def test_sdxl_resume_continues_bit_for_bit(make_config, tiny_sdxl, tokenizer_dir, instance_dir, tmp_path):
    from dreambooth.events import CANCEL_FILE, Events

    config = _config(make_config, tiny_sdxl, max_steps=6, hflip=True, center_crop=False,
                     train_text_encoder_2=True, prior_preservation=False)
    straight = run(config, tmp_path / "a" / "zwx", Events())
    source, trained = read_tensors(tiny_sdxl.path), read_tensors(straight.checkpoints[-1])
    moved = {k for k in source if not torch.equal(source[k].float(), trained[k].float())}
    assert any(k.startswith("conditioner.embedders.1.") for k in moved)  # train_text_encoder_2 alone: the second
    assert not any(k.startswith("conditioner.embedders.0.") for k in moved)
    interrupted = tmp_path / "b" / "zwx"

    def cancel_at_3(event: dict) -> None:
        if event["event"] == "step" and event["step"] == 3:
            (interrupted / CANCEL_FILE).touch()

    first = run(config, interrupted, Events(on_event=cancel_at_3))
    assert first.cancelled and first.step == 3
    resumed = run(config, interrupted, Events())
    assert resumed.losses == straight.losses[3:]
    a, b = read_tensors(straight.checkpoints[-1]), read_tensors(resumed.checkpoints[-1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sdxl_time_ids_come_from_the_crop_actually_applied(tiny_sdxl, tokenizer_dir, tmp_path):
    """A 80x64 photo at 64 px: original size (64, 80), the centre crop starts 8 px in, and its mirror image's
    crop starts 8 px in from the other side (the same here); a random crop moves the corner, and the UNet sees it."""
    import random

    from PIL import Image

    from dreambooth.data.cache import ImageLatents, PromptEmbeddings
    from dreambooth.models.conditioning import ImageGeometry

    photo = tmp_path / "wide.png"
    Image.new("RGB", (100, 64), (200, 30, 30)).save(photo)
    components = tiny_sdxl.components
    centre = ImageLatents(components.vae, 64, True, True, None, "m", torch.device("cpu"), 32)
    centre.prepare([(photo, (64, 64))], (False, True), lambda *_: None)
    generator = torch.Generator().manual_seed(0)
    _, geometries = centre.sample([photo, photo], [False, True], (64, 64), random.Random(0), generator)
    assert geometries == [ImageGeometry((64, 100), (0, 18), (64, 64)), ImageGeometry((64, 100), (0, 18), (64, 64))]
    randomly = ImageLatents(components.vae, 64, False, False, None, "m", torch.device("cpu"), 32)
    corners = {randomly.sample([photo], [False], None, random.Random(seed), generator)[1][0].crop_top_left
               for seed in range(8)}
    assert len(corners) > 1 and all(top == 0 and 0 <= left <= 36 for top, left in corners)
    flipped = randomly.sample([photo], [True], None, random.Random(1), generator)[1][0]
    plain = randomly.sample([photo], [False], None, random.Random(1), generator)[1][0]
    assert flipped.crop_top_left[1] == 36 - plain.crop_top_left[1]

    prompts = PromptEmbeddings(family_named("sdxl"), components, torch.device("cpu"), use_cache=True)
    near, far = (prompts(["photo of zwx"], False, [ImageGeometry((64, 100), corner, (64, 64))])
                 for corner in ((0, 0), (0, 36)))
    assert near.time_ids.tolist() == [[64, 100, 0, 0, 64, 64]] and far.time_ids.tolist() == [[64, 100, 0, 36, 64, 64]]
    assert torch.equal(near.context, far.context) and near.pooled.shape == (1, 16)
    sample, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    with torch.no_grad():
        a = components.unet(sample, t, **near.unet_kwargs()).sample
        b = components.unet(sample, t, **far.unet_kwargs()).sample
    assert not torch.allclose(a, b)


def test_sdxl_context_is_both_penultimate_layers_and_the_pooled_embedding_the_second(tiny_sdxl, tokenizer_dir):
    from dreambooth.data.cache import PromptEmbeddings

    components = tiny_sdxl.components
    prompts = PromptEmbeddings(family_named("sdxl"), components, torch.device("cpu"), use_cache=False)
    conditioning = prompts(["photo of zwx disc"], trainable=False)
    ids = [tok(["photo of zwx disc"], padding="max_length", max_length=77, return_tensors="pt").input_ids
           for tok in (components.tokenizer, components.tokenizer_2)]
    with torch.no_grad():
        first = components.text_encoder(ids[0], output_hidden_states=True).hidden_states[-2]
        second = components.text_encoder_2(ids[1], output_hidden_states=True)
    assert torch.equal(conditioning.context, torch.cat([first, second.hidden_states[-2]], dim=-1))
    assert torch.equal(conditioning.pooled, second.text_embeds)
    assert ids[1][0, -1] == 0 and ids[0][0, -1] == 49407  # OpenCLIP pads with '!' (0), OpenAI's CLIP with end-of-text


def test_sd2_prediction_type_the_header_the_user_or_the_web_uis_test(tiny_sd2, tokenizer_dir, tmp_path):
    from safetensors.torch import save_file

    from dreambooth.models.load import load_model

    args = {"tokenizer_dir": str(tokenizer_dir), "config_dir": str(tiny_sd2.config_dir)}
    tensors = read_tensors(tiny_sd2.path)
    silent = tmp_path / "silent.safetensors"
    save_file(tensors, str(silent))  # no header: the config folder given for it decides (v here)
    assert load_model(silent, cache_dir=tmp_path / "c", **args).components.prediction_type == "v_prediction"
    declared = tmp_path / "eps.safetensors"
    save_file(tensors, str(declared), {"modelspec.prediction_type": "epsilon"})
    loaded = load_model(declared, cache_dir=tmp_path / "c", **args)
    assert loaded.components.prediction_type == "epsilon"
    forced = load_model(declared, cache_dir=tmp_path / "c", **args, prediction_type="v_prediction")
    assert forced.components.prediction_type == "v_prediction"
    # what a stock-shaped file that declares nothing gets: the web UI's test on the UNet (random weights predict
    # epsilon; a UNet whose output at t=999 sits far below its input is a v model)
    sd2 = family_named("sd2")
    assert sd2.detect_prediction(loaded.components) == "epsilon"
    with torch.no_grad():
        loaded.components.unet.conv_out.bias.fill_(-3.0)
    assert sd2.detect_prediction(loaded.components) == "v_prediction"


def test_a_half_precision_vae_encodes_in_fp32_and_gives_no_nan(tiny_sdxl, tmp_path):
    """SDXL's VAE overflows fp16: a VAE stored in fp16 whose activations pass 65504 still gives finite latents."""
    import copy
    import random

    from PIL import Image

    from dreambooth.data.cache import ImageLatents

    vae = copy.deepcopy(tiny_sdxl.components.vae)
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(80000.0)  # its first activations pass fp16's 65504
    photo = tmp_path / "p.png"
    Image.new("RGB", (64, 64), (250, 250, 250)).save(photo)
    vae.half()
    with torch.no_grad():  # what encoding in the VAE's own fp16 gives
        assert not torch.isfinite(vae.encode(torch.ones(1, 3, 64, 64).half()).latent_dist.mean).all()
    latents = ImageLatents(vae, 64, True, True, None, "m", torch.device("cpu"), 32)
    latents.prepare([(photo, (64, 64))], (False,), lambda *_: None)
    sample, _ = latents.sample([photo], [False], (64, 64), random.Random(0), torch.Generator().manual_seed(0))
    assert torch.isfinite(sample).all()
    assert next(vae.parameters()).dtype == torch.float16  # handed back as it was


def test_an_sdxl_v_prediction_export_carries_the_v_pred_marker_and_reads_back_as_v(tiny_sdxl, tokenizer_dir, tmp_path):
    from diffusers import DDPMScheduler

    from dreambooth.models.export import checkpoint_tensors, save_checkpoint
    from dreambooth.models.load import load_model

    components = tiny_sdxl.components
    v = dataclasses.replace(components, scheduler=DDPMScheduler.from_config(components.scheduler.config,
                                                                            prediction_type="v_prediction"))
    assert "v_pred" not in checkpoint_tensors(components)
    path = save_checkpoint(tmp_path / "v.safetensors", checkpoint_tensors(v))
    assert "v_pred" in read_tensors(path)
    loaded = load_model(path, cache_dir=tmp_path / "c", tokenizer_dir=str(tokenizer_dir),
                        config_dir=str(tiny_sdxl.config_dir))
    assert loaded.components.prediction_type == "v_prediction"


def test_sdxl_second_text_encoder_learning_rate(make_config, tiny_sdxl, tokenizer_dir, instance_dir, tmp_path):
    from dreambooth.events import Events

    key = "conditioner.embedders.1.model.ln_final.weight"
    weights = []
    for lr in (1e-3, 1e-2):
        config = _config(make_config, tiny_sdxl, max_steps=2, prior_preservation=False,
                         train_text_encoder_2=True, text_encoder_2_lr=lr)
        weights.append(read_tensors(run(config, tmp_path / str(lr) / "zwx", Events()).checkpoints[-1])[key])
    assert not torch.equal(weights[0], weights[1])
