"""``python -m dreambooth`` as a user runs it: train with JSON events, convert both ways."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from dreambooth.config import save_config
from dreambooth.models.read import read_tensors

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dreambooth", *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=600
    )


def test_train_prints_json_events_and_logs_them(make_config, model_dir):
    save_config(make_config(max_steps=2, save_every=1), model_dir / "config.json")
    done = _cli("train", model_dir / "config.json", "--json")
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "status" and kinds[-1] == "finished"
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2]
    saved = [e["path"] for e in events if e["event"] == "checkpoint_saved"]
    assert [Path(p).name for p in saved] == ["zwx_1.safetensors", "zwx_2.safetensors"]
    assert all(Path(p).is_file() for p in saved)
    logged = (model_dir / "logs" / "events.jsonl").read_text().splitlines()
    assert [json.loads(line)["event"] for line in logged] == kinds
    step = next(e for e in events if e["event"] == "step")
    assert {"loss", "lr", "it_per_s", "eta_s", "memory_mb", "total"} <= step.keys()


def test_train_exits_1_with_an_error_event_naming_the_problem(make_config, model_dir, tmp_path):
    bogus = tmp_path / "notes.ckpt"
    bogus.write_text("shopping list")
    save_config(make_config(source_checkpoint=str(bogus)), model_dir / "config.json")
    done = _cli("train", model_dir / "config.json", "--json")
    assert done.returncode == 1
    error = json.loads(done.stdout.splitlines()[-1])
    assert error["event"] == "error" and "notes.ckpt" in error["message"] and error["advice"]
    assert not list(model_dir.rglob("*.safetensors"))


def test_a_bad_config_file_is_reported_on_stderr(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_name": "x", "learning_rate": "high"}))
    done = _cli("train", path)
    assert done.returncode == 1 and "'learning_rate' must be a number" in done.stderr


def test_convert_single_file_to_diffusers_and_back(tmp_path, tiny):
    folder = tmp_path / "diffusers"
    done = _cli("convert", tiny.path, folder, "--config-dir", tiny.config_dir)
    assert done.returncode == 0, done.stderr
    assert (folder / "model_index.json").is_file() and (folder / "unet" / "config.json").is_file()
    back = tmp_path / "back.safetensors"
    done = _cli("convert", folder, back, "--dtype", "fp32")
    assert done.returncode == 0, done.stderr
    source, again = read_tensors(tiny.path), read_tensors(back)
    model_keys = {k for k in source if k.startswith(("model.", "first_stage_model.", "cond_stage_model."))}
    assert set(again) == model_keys
    assert all(torch.equal(again[k], source[k]) for k in model_keys)


def test_convert_refuses_to_overwrite(tmp_path, tiny):
    existing = tmp_path / "x.safetensors"
    existing.write_bytes(b"keep me")
    done = _cli("convert", tiny.path.parent, existing)
    assert done.returncode == 1 and existing.read_bytes() == b"keep me"


def test_terminal_progress_shows_step_loss_speed_and_eta():
    import io

    from dreambooth.events import TerminalProgress

    out = io.StringIO()
    show = TerminalProgress(out)
    show({"event": "started", "model": "zwx", "total_steps": 10, "resumed_from": 0})
    show({"event": "step", "step": 3, "total": 10, "loss": 0.1234, "it_per_s": 2.5, "eta_s": 2.8})
    show({"event": "checkpoint_saved", "path": "out/zwx_3.safetensors", "step": 3})
    text = out.getvalue()
    assert "training zwx: 10 steps" in text
    assert "3/10 loss 0.1234 2.50 it/s ETA 0:02" in text
    assert "\nsaved out/zwx_3.safetensors\n" in text


def test_a_run_whose_supervisor_closes_stdin_cancels_itself(make_config, model_dir):
    save_config(make_config(max_steps=500, save_every=0), model_dir / "config.json")
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dreambooth",
            "train",
            str(model_dir / "config.json"),
            "--json",
            "--cancel-on-stdin-eof",
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    for line in child.stdout:
        if json.loads(line)["event"] == "step":
            child.stdin.close()  # the supervisor is gone
            break
    rest = [json.loads(line) for line in child.stdout]
    assert child.wait(timeout=120) == 0
    finished = rest[-1]
    assert finished["event"] == "finished" and finished["cancelled"] and finished["step"] < 500


def test_yaml_for_the_demo_model_placed_in_a_web_ui_folder(tmp_path, tokenizer_dir):
    import shutil

    import yaml

    from dreambooth.demo.run import DEMO_CHECKPOINT

    placed = tmp_path / "Stable-diffusion" / "shapes-sd1.safetensors"
    placed.parent.mkdir()
    shutil.copyfile(DEMO_CHECKPOINT, placed)
    done = _cli("yaml", placed, "--tokenizer-dir", tokenizer_dir)
    assert done.returncode == 0, done.stderr
    params = yaml.safe_load(placed.with_suffix(".yaml").read_text())["model"]["params"]
    assert params["unet_config"]["params"]["model_channels"] == 64
    from dreambooth.models.host_yaml import hub_cache

    name = params["cond_stage_config"]["params"]["version"]  # a model in the Hugging Face cache, not a folder
    entry = hub_cache() / ("models--" + name.replace("/", "--"))
    snapshot = entry / "snapshots" / (entry / "refs" / "main").read_text()
    assert json.loads((snapshot / "config.json").read_text())["hidden_size"] == 64
    assert (snapshot / "vocab.json").is_file() and (snapshot / "merges.txt").is_file()


def test_yaml_refuses_a_stock_shaped_checkpoint(tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(1)}, str(plain))
    done = _cli("yaml", plain)
    assert done.returncode == 1 and "needs no .yaml" in done.stderr
    assert not plain.with_suffix(".yaml").exists()


def test_yaml_refuses_a_shape_the_web_ui_cannot_build(tmp_path, tiny):
    """The tiny model's 8 normalisation groups: no yaml can make the web UI's code (32 groups) build it."""
    from dreambooth.models.export import config_metadata, save_checkpoint
    from dreambooth.models.load import read_config_folder
    from dreambooth.models.read import read_tensors

    placed = save_checkpoint(tmp_path / "tiny.safetensors", read_tensors(tiny.path),
                             config_metadata(read_config_folder(tiny.config_dir)))
    done = _cli("yaml", placed)
    assert done.returncode == 1 and "normalises in 8 groups" in done.stderr, done.stderr
    assert not placed.with_suffix(".yaml").exists()


def test_new_takes_the_resolution_from_the_source_model(tmp_path, tokenizer_dir):
    """The demo model declares 64 px in its header; an SDXL file that declares nothing gets SDXL's 1024, an SD 2.x
    file that says it predicts v gets 768, one that says epsilon 512."""
    import sys as _sys

    _sys.path.insert(0, str(ROOT / "tests"))
    from tiny_families import build_tiny_sd2, build_tiny_sdxl, write_tiny_single_file

    from dreambooth.demo.run import DEMO_CHECKPOINT as DEMO_MODEL

    sdxl = write_tiny_single_file(build_tiny_sdxl(tokenizer_dir), "sdxl", tmp_path / "xl.safetensors")
    sd2_v = write_tiny_single_file(build_tiny_sd2(tokenizer_dir), "sd2", tmp_path / "v.safetensors",
                                   {"modelspec.prediction_type": "v"})
    sd2 = write_tiny_single_file(build_tiny_sd2(tokenizer_dir), "sd2", tmp_path / "e.safetensors")
    photos = tmp_path / "photos"
    photos.mkdir()
    for source, expected in ((DEMO_MODEL, 64), (sdxl, 1024), (sd2_v, 768), (sd2, 512)):
        folder = tmp_path / f"m{expected}"
        done = _cli("new", folder, "--source", source, "--instance-dir", photos, "--instance-prompt", "photo of zwx")
        assert done.returncode == 0, done.stderr
        assert json.loads((folder / "config.json").read_text())["resolution"] == expected, source
