"""The engine end to end on the tiny model: what changes, what must not, resume, class images."""

from __future__ import annotations

import torch

from dreambooth.engine import run
from dreambooth.events import CANCEL_FILE, Events
from dreambooth.models.read import read_tensors


def _parts(tensors):
    groups = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model."}
    return {name: {k: v for k, v in tensors.items() if k.startswith(prefix)} for name, prefix in groups.items()}


def _changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_training_changes_the_unet_and_nothing_frozen(make_config, model_dir, events, tiny):
    result = run(make_config(max_steps=2), model_dir, events)
    assert [p.name for p in result.checkpoints] == ["zwx_2.safetensors"]
    source, trained = _parts(read_tensors(tiny.path)), _parts(read_tensors(result.checkpoints[0]))
    assert len(_changed(source["unet"], trained["unet"])) > 0.9 * len(source["unet"])
    assert _changed(source["vae"], trained["vae"]) == set()
    assert _changed(source["text_encoder"], trained["text_encoder"]) == set()  # frozen: bit-identical


def test_text_encoder_trains_when_asked_and_stops_at_its_fraction(make_config, model_dir, events, tiny):
    config = make_config(
        max_steps=4, save_every=1, train_text_encoder=True, text_encoder_lr=1e-3, text_encoder_stop=0.5
    )
    result = run(config, model_dir, events)
    source = _parts(read_tensors(tiny.path))["text_encoder"]
    at = {p.stem.split("_")[-1]: _parts(read_tensors(p))["text_encoder"] for p in result.checkpoints}
    assert _changed(source, at["1"]) and _changed(at["1"], at["2"])
    assert _changed(at["2"], at["4"]) == set()  # frozen after half of the 4 steps


def test_without_prior_preservation_class_images_are_never_touched(make_config, model_dir, events, tmp_path):
    unreadable = tmp_path / "class"
    unreadable.mkdir()
    for i in range(3):
        (unreadable / f"{i}.png").write_bytes(b"")  # would fail the moment anything opened them
    config = make_config(prior_preservation=False, concept={"class_dir": str(unreadable), "num_class_images": 5})
    run(config, model_dir, events)
    assert not (model_dir / "class_images").exists()
    assert not any(e["event"] == "progress" and "class" in e["phase"] for e in events.collected)


def test_missing_class_images_are_generated_once_and_reused(make_config, model_dir, tmp_path):
    config = make_config(max_steps=1, concept={"num_class_images": 3})
    first = Events(on_event=lambda e: None)
    run(config, model_dir, first)
    folders = list((model_dir / "class_images").iterdir())
    assert len(folders) == 1 and len(list(folders[0].glob("*.png"))) == 3
    seen: list[dict] = []
    more = make_config(max_steps=1, concept={"num_class_images": 4})
    run(more, model_dir, Events(on_event=seen.append))
    generated = [e for e in seen if e["event"] == "progress" and e["phase"] == "Generating class images"]
    assert generated and generated[-1]["total"] == 1  # only the missing one
    assert len(list(folders[0].glob("*.png"))) == 4


def test_user_class_images_count_towards_the_total(make_config, model_dir, tmp_path, instance_dir):
    from conftest import draw_subject

    own = tmp_path / "own_class"
    for i in range(2):
        draw_subject(own / f"c{i}.png", seed=100 + i, colour=(40, 40, 220))
    seen: list[dict] = []
    run(
        make_config(max_steps=1, concept={"class_dir": str(own), "num_class_images": 2}),
        model_dir,
        Events(on_event=seen.append),
    )
    assert not (model_dir / "class_images").exists()
    assert not any(e["event"] == "progress" and e["phase"] == "Generating class images" for e in seen)


def _cancel_at(model_dir, step):
    def listener(event):
        if event["event"] == "step" and event["step"] == step:
            (model_dir / CANCEL_FILE).write_text("")

    return listener


def test_resume_continues_bit_for_bit(make_config, tmp_path):
    config = make_config(max_steps=8, lr_scheduler="linear", hflip=True, train_text_encoder=True)
    straight = run(config, tmp_path / "a" / "zwx", Events())
    interrupted_dir = tmp_path / "b" / "zwx"
    first = run(config, interrupted_dir, Events(on_event=_cancel_at(interrupted_dir, 4)))
    assert first.cancelled and first.step == 4 and first.checkpoints == []
    assert (interrupted_dir / "state").is_dir()
    seen: list[dict] = []
    resumed = run(config, interrupted_dir, Events(on_event=seen.append))
    assert next(e for e in seen if e["event"] == "started")["resumed_from"] == 4
    assert resumed.losses == straight.losses[4:]
    a, b = read_tensors(straight.checkpoints[-1]), read_tensors(resumed.checkpoints[-1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_cancel_keeps_saved_checkpoints_and_writes_no_partial_file(make_config, model_dir):
    result = run(make_config(max_steps=6, save_every=2), model_dir, Events(on_event=_cancel_at(model_dir, 3)))
    assert result.cancelled and result.step == 3
    out = model_dir / "checkpoints"
    assert sorted(p.name for p in out.iterdir()) == ["zwx_2.safetensors"]  # the tiny shape gets no .yaml
    assert not list(model_dir.rglob("*.partial"))
    assert not (model_dir / CANCEL_FILE).exists()


def test_a_run_deletes_the_working_copy_earlier_versions_kept_and_nothing_else(make_config, model_dir):
    """Earlier versions kept a diffusers copy of the source in ``working/`` (2-7 GB): the next run deletes it, says
    so, and trains from the source itself; a folder of the user's own named ``working`` without our stamp stays."""
    working = model_dir / "working"
    (working / "unet").mkdir(parents=True)
    (working / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"0" * 4096)
    (working / "source.json").write_text('{"source_id": "x"}')
    seen = []
    result = run(make_config(max_steps=1), model_dir, Events(on_event=seen.append))
    assert result.step == 1 and not working.exists()
    assert any(e["event"] == "status" and "Removed" in e["message"] and "working" in e["message"] for e in seen)
    mine = model_dir.parent / "other" / "working"
    (mine / "notes").mkdir(parents=True)
    run(make_config(max_steps=1), model_dir.parent / "other", Events())
    assert (mine / "notes").is_dir()


def test_a_diffusers_folder_trains_like_its_single_file(make_config, tmp_path, tiny):
    from dreambooth.models.load import load_model
    from dreambooth.models.pipeline import inference_pipeline

    folder = tmp_path / "diffusers"
    loaded = load_model(tiny.path, cache_dir=tmp_path / "c", config_dir=str(tiny.config_dir))
    inference_pipeline(loaded.family, loaded.components).save_pretrained(str(folder))
    from_file = run(make_config(max_steps=2), tmp_path / "a" / "zwx", Events())
    from_folder = run(make_config(max_steps=2, source_checkpoint=str(folder)), tmp_path / "b" / "zwx", Events())
    assert from_folder.losses == from_file.losses
    a, b = read_tensors(from_file.checkpoints[-1]), read_tensors(from_folder.checkpoints[-1])
    model_keys = set(b)  # a folder has no noise-schedule buffers to carry over
    assert model_keys <= set(a) and all(torch.equal(a[k], b[k]) for k in model_keys)


def test_an_empty_class_folder_means_generate_them_all(make_config, model_dir, tmp_path):
    empty = tmp_path / "my_class_images"
    empty.mkdir()
    seen: list[dict] = []
    run(make_config(max_steps=1, concept={"class_dir": str(empty), "num_class_images": 2}), model_dir,
        Events(on_event=seen.append))
    generated = [e for e in seen if e["event"] == "progress" and e["phase"] == "Generating class images"]
    assert generated[-1]["done"] == 2
