"""The supervisor runs one training child at a time, mirrors its events and cancels it without losing files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from supervisor_fakes import RecordingHost, write_fake_engine

from dreambooth.config import Concept, TrainConfig
from dreambooth.errors import ConfigError
from dreambooth.supervisor import Busy, Supervisor


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    (models / "Stable-diffusion" / "base.safetensors").write_bytes(b"base")
    host = RecordingHost(models)
    supervisor = Supervisor(host, models / "dreambooth", models / "Stable-diffusion",
                            launcher=write_fake_engine(tmp_path), cancel_timeout=5.0, poll_interval=0.02)
    monkeypatch.setenv("FAKE_ENGINE_DELAY", "0.01")
    return supervisor, host, tmp_path


def trainable(supervisor: Supervisor, name: str = "zwx", steps: int = 4, save_every: int = 2) -> TrainConfig:
    config = supervisor.create_model(name, "base.safetensors")
    config.concepts = [Concept(instance_dir="photos", instance_prompt="photo of zwx dog",
                               class_prompt="photo of a dog")]
    config.max_steps, config.save_every = steps, save_every
    return config


def test_create_model_writes_config_with_output_in_the_hosts_checkpoint_folder(setup) -> None:
    supervisor, host, _ = setup
    config = supervisor.create_model("zwx", "base.safetensors")
    assert config.source_checkpoint == str(host.models_dir / "Stable-diffusion" / "base.safetensors")
    assert Path(config.output_dir) == host.models_dir / "Stable-diffusion" / "zwx"
    saved = json.loads((host.models_dir / "dreambooth" / "zwx" / "config.json").read_text())
    assert saved["model_name"] == "zwx" and saved["output_dir"] == config.output_dir
    assert supervisor.list_models() == ["zwx"]
    assert supervisor.load_config("zwx") == config


def test_a_lora_run_writes_into_the_hosts_lora_folder_and_refreshes_its_lora_list(setup) -> None:
    supervisor, host, _ = setup
    config = trainable(supervisor, steps=4, save_every=2)
    config.method = "lora"  # created as a full fine-tune: its output folder is the checkpoint dropdown's
    supervisor.start(config)
    assert supervisor.wait(30)
    out = host.models_dir / "Lora" / "zwx"
    assert supervisor.status().checkpoints == [str(out / "zwx_2.safetensors"), str(out / "zwx_4.safetensors")]
    assert supervisor.load_config("zwx").output_dir == str(out)
    assert not (host.models_dir / "Stable-diffusion" / "zwx").exists()
    assert host.names().count("refresh_loras") == 2
    config.method = "full"  # and back: checkpoints go where the dropdown lists them again
    supervisor.start(config)
    assert supervisor.wait(30)
    assert supervisor.load_config("zwx").output_dir == str(host.models_dir / "Stable-diffusion" / "zwx")


@pytest.mark.parametrize("name", ["../evil", "a/b", "/abs", "C:\\x", "", "con", ".hidden"])
def test_create_model_refuses_names_outside_the_folder(setup, name: str) -> None:
    supervisor, host, _ = setup
    with pytest.raises(ConfigError):
        supervisor.create_model(name, "base.safetensors")
    assert not (host.models_dir / "dreambooth").exists() or supervisor.list_models() == []


def test_create_model_refuses_an_existing_name_and_an_unknown_source(setup) -> None:
    supervisor, _, _ = setup
    supervisor.create_model("zwx", "base.safetensors")
    with pytest.raises(ConfigError, match="already exists"):
        supervisor.create_model("zwx", "base.safetensors")
    with pytest.raises(ConfigError, match="neither"):
        supervisor.create_model("other", "missing.safetensors")


def test_a_run_mirrors_events_into_status_and_the_host(setup) -> None:
    supervisor, host, _ = setup
    config = trainable(supervisor, steps=4, save_every=2)
    supervisor.start(config)
    assert supervisor.wait(30)
    status = supervisor.status()
    assert (status.running, status.finished, status.cancelled, status.error) == (False, True, False, None)
    assert (status.step, status.total, status.model) == (4, 4, "zwx")
    assert status.loss == pytest.approx(0.25) and status.it_per_s == 10.0 and status.memory_mb == 123.0
    assert [h["step"] for h in status.history] == [1, 2, 3, 4]
    out = host.models_dir / "Stable-diffusion" / "zwx"
    assert status.checkpoints == [str(out / "zwx_2.safetensors"), str(out / "zwx_4.safetensors")]
    assert status.last_checkpoint == str(out / "zwx_4.safetensors")
    assert status.warnings == ["a warning from the engine"] and status.samples[-1].endswith("s2.png")
    assert supervisor.list_checkpoints("zwx") == [out / "zwx_2.safetensors", out / "zwx_4.safetensors"]
    names = host.names()
    assert names[0] == "unload_model" and names[-1] == "reload_model"
    assert names.index("job_started") < names.index("job_progress") < names.index("job_finished")
    # every save made the host re-list its checkpoints while the run went on
    assert names[:names.index("job_finished")].count("refresh_checkpoints") == 2
    assert ("job_progress", 4, 4, "step 4/4") in host.calls
    assert "zwx/zwx_4.safetensors" in host.checkpoint_titles()


def test_second_start_is_busy_with_the_running_models_name(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    supervisor, _, _ = setup
    monkeypatch.setenv("FAKE_ENGINE_DELAY", "0.05")
    supervisor.start(trainable(supervisor, "first", steps=200))
    try:
        with pytest.raises(Busy) as caught:
            supervisor.start(trainable(supervisor, "second"))
        assert caught.value.running_model == "first"
        assert supervisor.running_model() == "first"
    finally:
        supervisor.cancel()
        assert supervisor.wait(30)


def test_cancel_stops_after_the_current_step_and_keeps_saved_files(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    supervisor, host, _ = setup
    monkeypatch.setenv("FAKE_ENGINE_DELAY", "0.05")
    supervisor.start(trainable(supervisor, steps=400, save_every=3))
    _wait_for(lambda: supervisor.status().checkpoints)
    supervisor.cancel()
    assert supervisor.wait(30)
    status = supervisor.status()
    assert status.cancelled and status.finished and not status.running and status.error is None
    assert 3 <= status.step < 400
    assert not (host.models_dir / "dreambooth" / "zwx" / "cancel.request").exists()
    files = supervisor.list_checkpoints("zwx")
    assert files and [str(f) for f in files] == status.checkpoints
    assert not list((host.models_dir / "Stable-diffusion").rglob("*.partial"))
    assert host.names()[-1] == "reload_model"


def test_the_hosts_interrupt_button_cancels(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    supervisor, host, _ = setup
    monkeypatch.setenv("FAKE_ENGINE_DELAY", "0.05")
    supervisor.start(trainable(supervisor, steps=400))
    _wait_for(lambda: supervisor.status().step >= 2)
    host.interrupted = True
    assert supervisor.wait(30)
    assert supervisor.status().cancelled and supervisor.status().step < 400


def test_a_child_that_ignores_the_request_is_terminated_after_the_timeout(setup, monkeypatch) -> None:
    supervisor, _, _ = setup
    supervisor.cancel_timeout = 0.5
    monkeypatch.setenv("FAKE_ENGINE_MODE", "stubborn")
    monkeypatch.setenv("FAKE_ENGINE_DELAY", "0.05")
    supervisor.start(trainable(supervisor, steps=2000))
    _wait_for(lambda: supervisor.status().step >= 1)
    supervisor.cancel()
    assert supervisor.wait(30)
    status = supervisor.status()
    assert status.cancelled and not status.running and "terminated" in status.message
    assert status.step < 2000


def test_shutdown_of_the_web_ui_cancels_a_running_training(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    supervisor, _, _ = setup
    monkeypatch.setenv("FAKE_ENGINE_DELAY", "0.05")
    supervisor.start(trainable(supervisor, steps=400))
    _wait_for(lambda: supervisor.status().step >= 1)
    supervisor.shutdown(timeout=20)
    status = supervisor.status()
    assert not status.running and status.cancelled and status.step < 400


def test_a_failing_host_becomes_a_warning_not_a_stuck_run(setup) -> None:
    supervisor, host, _ = setup

    def broken(*_args: object) -> None:
        raise RuntimeError("the web UI is busy")

    host.job_started = host.refresh_checkpoints = broken
    supervisor.start(trainable(supervisor, steps=2, save_every=1))
    assert supervisor.wait(30)
    status = supervisor.status()
    assert status.finished and not status.running and supervisor.running_model() is None
    assert "Could not show the job: the web UI is busy" in status.warnings
    assert "Could not refresh the checkpoint list: the web UI is busy" in status.warnings
    assert host.names()[-1] == "reload_model"


def test_an_error_event_becomes_the_status_error(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    supervisor, host, _ = setup
    monkeypatch.setenv("FAKE_ENGINE_MODE", "error")
    supervisor.start(trainable(supervisor))
    assert supervisor.wait(30)
    status = supervisor.status()
    assert status.error == "No images in /nowhere. Add photos." and not status.finished and not status.running
    assert host.names()[-1] == "reload_model"


def test_a_crash_reports_the_exit_code_and_the_childs_last_words(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    supervisor, _, _ = setup
    monkeypatch.setenv("FAKE_ENGINE_MODE", "crash")
    supervisor.start(trainable(supervisor))
    assert supervisor.wait(30)
    error = supervisor.status().error
    assert error is not None and "code 3" in error and "RuntimeError: boom" in error
    # the supervisor is free again
    monkeypatch.setenv("FAKE_ENGINE_MODE", "train")
    supervisor.start(trainable(supervisor, "again", steps=2))
    assert supervisor.wait(30) and supervisor.status().finished


def test_an_invalid_config_is_refused_before_anything_starts(setup) -> None:
    supervisor, host, _ = setup
    config = supervisor.create_model("zwx", "base.safetensors")  # no concept
    with pytest.raises(ConfigError, match="no concept"):
        supervisor.start(config)
    assert "unload_model" not in host.names() and supervisor.running_model() is None


def test_a_stale_cancel_request_does_not_stop_the_next_run(setup) -> None:
    supervisor, host, _ = setup
    config = trainable(supervisor, steps=3)
    (host.models_dir / "dreambooth" / "zwx" / "cancel.request").touch()
    supervisor.start(config)
    assert supervisor.wait(30)
    assert supervisor.status().finished and not supervisor.status().cancelled and supervisor.status().step == 3


def test_list_checkpoints_never_lists_partial_files(setup) -> None:
    supervisor, host, _ = setup
    supervisor.create_model("zwx", "base.safetensors")
    out = host.models_dir / "Stable-diffusion" / "zwx"
    out.mkdir()
    (out / "zwx_5.safetensors.partial").write_bytes(b"half")
    (out / "zwx_5.yaml").write_text("sidecar")
    (out / "zwx_3.ckpt").write_bytes(b"x")
    assert supervisor.list_checkpoints("zwx") == [out / "zwx_3.ckpt"]


def test_the_real_engine_trains_a_tiny_model_and_cancels_cleanly(tmp_path: Path, make_config) -> None:
    """Real runs of ``python -m dreambooth train --json`` on the tiny checkpoint, supervised end to end."""
    models = tmp_path / "web-ui" / "models"
    host = RecordingHost(models)
    supervisor = Supervisor(host, models / "dreambooth", models / "Stable-diffusion", poll_interval=0.05)
    supervisor.start(make_config(max_steps=4, save_every=2, prior_preservation=False))
    assert supervisor.wait(300)
    status = supervisor.status()
    assert status.error is None and status.finished and not status.cancelled, status
    out = models / "Stable-diffusion" / "zwx"
    assert status.checkpoints == [str(out / "zwx_2.safetensors"), str(out / "zwx_4.safetensors")]
    assert [h["step"] for h in status.history] == [1, 2, 3, 4] and status.loss is not None
    assert supervisor.list_checkpoints("zwx") == [out / "zwx_2.safetensors", out / "zwx_4.safetensors"]
    assert {"zwx/zwx_2.safetensors", "zwx/zwx_4.safetensors"} <= set(host.checkpoint_titles())
    assert host.names()[0] == "unload_model" and host.names()[-1] == "reload_model"

    supervisor.start(make_config(model_name="long", max_steps=100_000, save_every=1, prior_preservation=False))
    _wait_for(lambda: supervisor.status().checkpoints, timeout=120)
    supervisor.cancel()
    assert supervisor.wait(120)
    status = supervisor.status()
    assert status.cancelled and status.error is None and 1 <= status.step < 100_000
    files = supervisor.list_checkpoints("long")
    assert files and [str(f) for f in files] == status.checkpoints
    assert not list(models.rglob("*.partial")) and not (models / "dreambooth" / "long" / "cancel.request").exists()


def test_the_real_engines_error_reaches_the_status(tmp_path: Path, make_config) -> None:
    models = tmp_path / "web-ui" / "models"
    host = RecordingHost(models)
    supervisor = Supervisor(host, models / "dreambooth", models / "Stable-diffusion", poll_interval=0.05)
    (tmp_path / "empty").mkdir()
    supervisor.start(make_config(concept={"instance_dir": str(tmp_path / "empty")}, prior_preservation=False))
    assert supervisor.wait(300)
    status = supervisor.status()
    assert status.error and str(tmp_path / "empty") in status.error and not status.finished, status
    assert host.names()[-1] == "reload_model" and supervisor.running_model() is None


def _wait_for(condition, timeout: float = 20.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
