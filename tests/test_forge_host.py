"""host/forge.py against the stand-in Forge (tests/fake_forge.py): Forge's memory manager, its dropdown's names,
its checkpoint switch, and the registration picking Forge's adapter because ``modules_forge`` is importable.
The same names are checked against a real Forge in test_host_contract.py when SD_WEBUI_DIR names one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from host_contract import FORGE_PIN, check_source, load_pin

WEB_UI_PACKAGES = ("modules", "modules_forge", "backend")
OURS = {"dreambooth.host.forge", "dreambooth.host.a1111", "dreambooth.host.webui", "dreambooth.extension"}


def _forget(names: list[str]) -> None:
    for name in names:
        sys.modules.pop(name, None)


@pytest.fixture
def forge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """forge.py imported against the stand-in Forge, with two checkpoints in its models folder."""
    from fake_forge import write_fake_forge

    root = write_fake_forge(tmp_path / "forge")
    models = tmp_path / "models"
    (models / "Stable-diffusion" / "sub").mkdir(parents=True)
    (models / "Stable-diffusion" / "base.safetensors").write_bytes(b"base")
    (models / "Stable-diffusion" / "sub" / "other.safetensors").write_bytes(b"other")
    monkeypatch.syspath_prepend(str(root))
    import dreambooth.host

    for attribute in ("forge", "a1111", "webui"):
        monkeypatch.delattr(dreambooth.host, attribute, raising=False)
    _forget([n for n in sys.modules if n.split(".")[0] in WEB_UI_PACKAGES or n in OURS])
    import modules
    from modules import paths, sd_models, shared, shared_state

    paths.models_path = str(models)
    sd_models.model_path = str(models / "Stable-diffusion")
    shared.state = shared_state.State()
    shared.refresh_checkpoints()
    modules.calls.clear()
    from dreambooth.host import forge as adapter

    yield adapter, modules, models
    _forget([n for n in sys.modules if n.split(".")[0] in WEB_UI_PACKAGES or n in OURS])
    for attribute in ("forge", "a1111", "webui"):
        if hasattr(dreambooth.host, attribute):
            delattr(dreambooth.host, attribute)


def test_the_stand_in_forge_honours_the_forge_pin(tmp_path: Path) -> None:
    from fake_forge import write_fake_forge

    assert check_source(write_fake_forge(tmp_path), load_pin(FORGE_PIN)) == []


def test_the_extension_picks_forges_adapter_where_modules_forge_imports(forge) -> None:
    from dreambooth.host.base import WebUi
    from dreambooth.host.select import running_in_forge, web_ui_host

    host = web_ui_host()
    assert running_in_forge() and type(host).__name__ == "ForgeHost" and isinstance(host, WebUi)
    assert host.checkpoint_refresh_element == "forge_refresh_checkpoint"


def test_forge_lists_names_without_hashes_and_resolves_every_alias(forge) -> None:
    adapter, modules, models = forge
    info = modules.sd_models.checkpoints_list["sub/other.safetensors"]
    short = info.calculate_shorthash()
    host = adapter.ForgeHost()
    assert host.checkpoint_titles() == ["base.safetensors", "sub/other.safetensors"]  # Forge's dropdown: names
    for name in ("sub/other.safetensors", f"sub/other.safetensors [{short}]", "other", short):
        assert host.checkpoint_file(name) == models / "Stable-diffusion" / "sub" / "other.safetensors"


def test_forge_frees_vram_through_its_memory_manager_and_loads_the_same_models_back(forge) -> None:
    adapter, modules, _ = forge
    memory = sys.modules["backend.memory_management"]
    unet, clip = object(), object()
    memory.current_loaded_models[:] = [memory.LoadedModel(unet), memory.LoadedModel(clip)]
    sd_models = modules.sd_models
    sd_models.model_data.sd_model = sd_models.FakeModel(sd_models.checkpoints_list["base.safetensors"])
    modules.shared.opts.data["sd_model_checkpoint"] = "base.safetensors"
    host = adapter.ForgeHost()
    host.unload_model()
    assert not modules.call_queue.queue_lock.acquire(blocking=False)  # Forge's queue is held
    assert modules.calls == [("unload_all_models", [unet, clip]), ("soft_empty_cache",)]
    assert memory.current_loaded_models == []
    modules.calls.clear()
    host.reload_model()
    assert modules.calls == [("load_models_gpu", [unet, clip])]
    assert modules.call_queue.queue_lock.acquire(blocking=False)
    modules.call_queue.queue_lock.release()


def test_a_checkpoint_chosen_during_training_is_handed_to_forge_instead_of_the_old_models(forge) -> None:
    adapter, modules, models = forge
    memory = sys.modules["backend.memory_management"]
    memory.current_loaded_models[:] = [memory.LoadedModel(object())]
    sd_models = modules.sd_models
    sd_models.model_data.sd_model = sd_models.FakeModel(sd_models.checkpoints_list["base.safetensors"])
    modules.shared.opts.data["sd_model_checkpoint"] = "base.safetensors"
    host = adapter.ForgeHost()
    host.unload_model()
    modules.calls.clear()
    assert host.select_checkpoint(models / "Stable-diffusion" / "sub" / "other.safetensors") == "sub/other.safetensors"
    assert ("checkpoint_change", "sub/other.safetensors") in modules.calls  # as Forge's own dropdown does it
    modules.calls.clear()
    host.reload_model()
    assert [c[0] for c in modules.calls] == ["refresh_model_loading_parameters"]  # Forge loads it lazily
    assert modules.call_queue.queue_lock.acquire(blocking=False)
    modules.call_queue.queue_lock.release()


def test_forge_can_keep_its_models_in_vram_and_mirrors_progress_and_interrupt(forge) -> None:
    adapter, modules, _ = forge
    modules.shared.opts.data["dreambooth_unload_model"] = False
    host = adapter.ForgeHost()
    host.unload_model()
    assert modules.calls == []
    host.reload_model()
    state = modules.shared.state
    host.job_started("DreamBooth: zwx", 10)
    host.job_progress(4, 10, "step 4/10")
    assert (state.job, state.sampling_step, state.sampling_steps, state.textinfo) == ("DreamBooth: zwx", 4, 10,
                                                                                      "step 4/10")
    state.interrupt()
    assert host.interrupt_requested()
    host.job_finished()


def test_forge_refuses_to_switch_under_frozen_settings(forge) -> None:
    adapter, modules, models = forge
    modules.shared.cmd_opts.freeze_settings = True
    with pytest.raises(Exception, match="frozen"):
        adapter.ForgeHost().select_checkpoint(models / "Stable-diffusion" / "base.safetensors")


def test_a_checkpoint_copied_in_after_the_last_listing_is_found_without_a_refresh_click(forge) -> None:
    """Seen in a real Forge: a file put into models/Stable-diffusion while Forge runs was refused as a source
    (`POST /dreambooth/v1/models`) until someone pressed 🔄; the lookup now re-lists once before it gives up."""
    adapter, modules, models = forge
    late = models / "Stable-diffusion" / "late.safetensors"
    late.write_bytes(b"late")
    host = adapter.ForgeHost()
    assert host.checkpoint_file("late.safetensors") == late
    assert "late.safetensors" in host.checkpoint_titles()
    with pytest.raises(KeyError):
        host.checkpoint_file("never-there.safetensors")
