"""The standalone app offers the demo model: copied once into an empty models folder, preselected as the source."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from supervisor_fakes import write_fake_engine

from dreambooth.config import TrainConfig
from dreambooth.demo.run import DEMO_CHECKPOINT
from dreambooth.demo.settings import settings
from dreambooth.host.standalone import DEMO_TITLE, StandaloneHost, install_demo_model
from dreambooth.supervisor import Supervisor
from dreambooth.ui.tab import build_tab


def _tab(models: Path, tmp_path: Path, default_source: str | None = DEMO_TITLE):
    host = StandaloneHost(models)
    supervisor = Supervisor(host, models / "dreambooth", host.checkpoints_dir, launcher=write_fake_engine(tmp_path))
    return build_tab(supervisor, host, default_source=default_source).dreambooth_tab


def test_an_empty_models_folder_gets_the_demo_model_and_its_yaml(tmp_path, tokenizer_dir):
    checkpoints = tmp_path / "models" / "Stable-diffusion"
    installed = install_demo_model(checkpoints, str(tokenizer_dir))
    assert installed == checkpoints / DEMO_TITLE
    assert installed.read_bytes() == DEMO_CHECKPOINT.read_bytes()
    unet = yaml.safe_load(installed.with_suffix(".yaml").read_text())["model"]["params"]["unet_config"]["params"]
    assert unet["model_channels"] == 64 and unet["context_dim"] == 64
    assert not [p for p in checkpoints.rglob("*") if p.name.endswith(".partial")]

    installed.write_bytes(b"the user's own training")  # a second start leaves everything as it is
    assert install_demo_model(checkpoints, str(tokenizer_dir)) is None
    assert installed.read_bytes() == b"the user's own training"


def test_a_models_folder_with_checkpoints_is_left_alone(tmp_path, tokenizer_dir):
    checkpoints = tmp_path / "models" / "Stable-diffusion"
    (checkpoints / "sub").mkdir(parents=True)
    (checkpoints / "sub" / "mine.ckpt").write_bytes(b"mine")
    assert install_demo_model(checkpoints, str(tokenizer_dir)) is None
    assert sorted(p.relative_to(checkpoints).as_posix() for p in checkpoints.rglob("*")) == ["sub", "sub/mine.ckpt"]


def test_the_new_model_form_starts_from_the_demo_model_with_the_demos_training_settings(tmp_path, tokenizer_dir):
    models = tmp_path / "models"
    install_demo_model(models / "Stable-diffusion", str(tokenizer_dir))
    tab = _tab(models, tmp_path)
    assert tab.source.value == DEMO_TITLE
    source_update = tab.restore()[-2]
    assert source_update["value"] == DEMO_TITLE and DEMO_TITLE in source_update["choices"]

    message = tab.create_model("shapes", DEMO_TITLE)[-1]
    assert "Created **shapes**" in message
    saved = json.loads((models / "dreambooth" / "shapes" / "config.json").read_text())
    assert saved["resolution"] == 64
    assert Path(saved["source_checkpoint"]) == models / "Stable-diffusion" / DEMO_TITLE
    demo = settings(quick=False)  # what `python -m dreambooth demo` trains with, not SD 1.5's defaults
    assert (saved["learning_rate"], saved["text_encoder_lr"], saved["max_steps"], saved["batch_size"]) == (
        demo.learning_rate, demo.text_encoder_lr, demo.steps, demo.batch_size)
    assert saved["train_text_encoder"] and saved["prior_loss_weight"] == demo.prior_loss_weight


def test_nothing_is_preselected_when_the_demo_model_is_not_listed(tmp_path):
    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    (models / "Stable-diffusion" / "base.safetensors").write_bytes(b"base")
    tab = _tab(models, tmp_path)
    assert tab.source.value in (None, "")
    assert "value" not in tab.restore()[-2]
    tab.create_model("other", "base.safetensors")  # no header to read: the default resolution stays
    saved = json.loads((models / "dreambooth" / "other" / "config.json").read_text())
    assert saved["resolution"] == 512
    assert saved["learning_rate"] == TrainConfig().learning_rate != settings(quick=False).learning_rate


def test_the_app_offers_the_demo_model_on_an_empty_models_folder(tmp_path, monkeypatch):
    import socket

    from dreambooth.ui.app import launch

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # gradio checks that it can reach itself
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    models = tmp_path / "models"
    blocks = launch(models, "127.0.0.1", port)
    try:
        assert (models / "Stable-diffusion" / DEMO_TITLE).is_file()
        assert (models / "Stable-diffusion" / DEMO_TITLE).with_suffix(".yaml").is_file()
        assert blocks.dreambooth_tab.source.value == DEMO_TITLE
    finally:
        blocks.close()
