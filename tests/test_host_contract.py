"""The contracts with the two web UIs: every name our adapters use is pinned with its signature, for the
AUTOMATIC1111 web UI (``host_contract.json``: ``host/webui.py`` + ``host/a1111.py``) and for Forge
(``forge_contract.json``: ``host/webui.py`` + ``host/forge.py``). Each pin is checked against the code here, and
against a real checkout when ``SD_WEBUI_DIR`` names one (its source, and its modules imported by its own Python:
``SD_WEBUI_PYTHON``, default ``$SD_WEBUI_DIR/venv/bin/python``, with the flags in ``SD_WEBUI_ARGS``, e.g.
``--always-cpu`` for Forge on a machine without a GPU). A checkout with a ``modules_forge/`` folder is
Forge and is checked against the Forge pin; any other against the web UI's."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from host_contract import (
    BINDING_KINDS,
    CONTRACTS,
    FORGE_PIN,
    PIN,
    REPO,
    WEBUI_ROOTS,
    check_import_script,
    check_source,
    is_forge,
    load_pin,
    used_names,
    used_names_of,
)

WEBUI = os.environ.get("SD_WEBUI_DIR")
needs_webui = pytest.mark.skipif(not WEBUI, reason="set SD_WEBUI_DIR to a web UI checkout to run")
needs_a1111 = pytest.mark.skipif(not WEBUI or is_forge(Path(WEBUI)),
                                 reason="set SD_WEBUI_DIR to an AUTOMATIC1111 web UI checkout to run")
needs_forge = pytest.mark.skipif(not WEBUI or not is_forge(Path(WEBUI)),
                                 reason="set SD_WEBUI_DIR to a Forge checkout to run")
THE_PIN = FORGE_PIN if WEBUI and is_forge(Path(WEBUI)) else PIN
"""The pin that SD_WEBUI_DIR's checkout is checked against."""


@pytest.mark.parametrize("contract", sorted(CONTRACTS))
def test_every_web_ui_name_the_adapters_use_is_pinned_and_called_as_pinned(contract: str) -> None:
    uses = used_names_of(contract)
    assert len(uses) > 30
    problems = [p for use in uses for p in use.problems]
    assert problems == []


@pytest.mark.parametrize("contract", sorted(CONTRACTS))
def test_every_pinned_name_is_used_by_the_adapters(contract: str) -> None:
    pin_path, sources = CONTRACTS[contract]
    pin = load_pin(pin_path)
    visited = {name for use in used_names_of(contract) for name in use.visited}
    source = "\n".join(path.read_text(encoding="utf-8") for path in sources)
    unused = []
    for name, entry in pin.items():
        if entry.get("indirect"):
            if not re.search(rf"\.{re.escape(name.rsplit('.', 1)[1])}\b", source):
                unused.append(name)
        elif name not in visited:
            unused.append(name)
    assert unused == [], f"pinned but not used: remove them from {pin_path.name}"


def test_only_the_adapters_import_the_web_uis_modules() -> None:
    files = [*(REPO / "dreambooth").rglob("*.py"), *(REPO / "scripts").glob("*.py"), REPO / "preload.py",
             REPO / "install.py"]
    importers = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            if any(n.split(".")[0] in WEBUI_ROOTS for n in names):
                importers.add(path.relative_to(REPO).as_posix())
    assert importers == {"dreambooth/host/webui.py", "dreambooth/host/a1111.py", "dreambooth/host/forge.py"}


def test_the_registration_and_everything_above_the_host_folder_never_name_a_web_ui() -> None:
    """Nothing outside dreambooth/host/ imports an adapter, names one, or asks which web UI it runs in."""
    adapter_names = {"a1111", "forge", "A1111Host", "ForgeHost", "running_in_forge", "webui", "WebUiCommon"}
    offenders = []
    for path in [*(REPO / "dreambooth").rglob("*.py"), *(REPO / "scripts").glob("*.py")]:
        if path.parent.name == "host":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            found = []
            if isinstance(node, ast.ImportFrom):
                found = [n for n in [*(node.module or "").split("."), *(a.name for a in node.names)]
                         if n in adapter_names]
            elif isinstance(node, ast.Name) and node.id in adapter_names:
                found = [node.id]
            elif isinstance(node, ast.Attribute) and node.attr in adapter_names:
                found = [node.attr]
            elif isinstance(node, ast.Constant) and node.value in ("modules_forge", "modules"):
                found = [node.value]
            offenders += [(path.relative_to(REPO).as_posix(), node.lineno, name) for name in found]
    assert offenders == []


def test_the_checker_catches_calls_that_do_not_fit(tmp_path: Path) -> None:
    fake = tmp_path / "a1111.py"
    fake.write_text(textwrap.dedent("""
        from modules import sd_models, shared, script_callbacks
        sd_models.send_model_to_cpu()                        # missing m
        sd_models.get_closet_checkpoint_match("a", "b")      # one too many
        script_callbacks.on_ui_tabs(print, title="x")        # no such keyword
        shared.state.begin(job="x")                          # fine
        shared.state.skip()                                  # not pinned
        shared.opts.data.get("x")                            # fine: data is a plain dict
    """))
    problems = [p for use in used_names(load_pin(), fake) for p in use.problems]
    assert len(problems) == 4, problems
    assert any("without the required 'm'" in p for p in problems)
    assert any("gets 2 positional" in p for p in problems)
    assert any("no parameter 'title'" in p for p in problems)
    assert any("modules.shared_state.State.skip" in p and "not pinned" in p for p in problems)


def fake_webui(root: Path, pin: dict[str, dict]) -> Path:
    """A source tree that has exactly the pinned names: what check_source must accept."""
    modules: dict[str, dict[str, list[str]]] = {}

    def module_of(name: str) -> tuple[str, list[str]]:
        parts = name.split(".")
        cut = next(i for i in range(len(parts)) if parts[i][:1].isupper() or i == len(parts) - 1)
        return ".".join(parts[:cut]), parts[cut:]

    for name, entry in pin.items():
        if entry["kind"] in ("option", "flag"):
            continue
        module, path = module_of(entry.get("at", name) if entry["kind"] == "function" else name)
        body = modules.setdefault(module, {})
        if len(path) == 1:
            body.setdefault("", []).append(f"def {path[0]}{entry['signature']}: pass" if entry["kind"] == "function"
                                           else f"{path[0]} = None")
        else:
            member = (f"def {path[1]}{entry['signature']}: pass" if entry["kind"] == "function"
                      else f"{path[1]} = None")
            body.setdefault(path[0], []).append(member)
        if entry["kind"] == "instance":
            target, target_path = module_of(entry["of"])
            modules.setdefault(target, {}).setdefault(target_path[0], [])
        if entry["kind"] == "function" and entry.get("at", name) != name:
            alias_module, alias_path = module_of(name)
            modules.setdefault(alias_module, {}).setdefault("", []).append(f"{alias_path[0]} = None")
    for module, body in modules.items():
        lines = list(body.get("", []))
        for cls, members in body.items():
            if cls:
                lines.append(f"class {cls}:\n" + "".join(f"    {m}\n" for m in members or ["pass"]))
        path = root / Path(*module.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
    options = [n.rsplit(".", 1)[1] for n, e in pin.items() if e["kind"] == "option"]
    flags = [n.rsplit(".", 1)[1] for n, e in pin.items() if e["kind"] == "flag"]
    (root / "modules" / "shared_options.py").write_text("".join(f'"{o}": OptionInfo(None),\n' for o in options))
    (root / "modules" / "cmd_args.py").write_text(
        "".join(f'parser.add_argument("--{f.replace("_", "-")}")\n' for f in flags))
    return root


@pytest.mark.parametrize("pin_path", [PIN, FORGE_PIN], ids=["a1111", "forge"])
def test_the_source_checker_accepts_a_tree_with_exactly_the_pinned_names(tmp_path: Path, pin_path: Path) -> None:
    assert check_source(fake_webui(tmp_path / "webui", load_pin(pin_path)), load_pin(pin_path)) == []


def test_the_source_checker_accepts_a_matching_tree_and_names_every_difference(tmp_path: Path) -> None:
    pin = load_pin()
    root = fake_webui(tmp_path / "webui", pin)
    assert check_source(root, pin) == []
    state = root / "modules" / "shared_state.py"
    state.write_text(state.read_text().replace("def begin(self, job: str = '(unknown)')", "def begin(self, title)")
                     .replace("interrupted = None", "stopped = None"))
    (root / "modules" / "cmd_args.py").write_text("")
    problems = check_source(root, pin)
    assert len(problems) == 4, problems
    assert any(p.startswith("modules.shared_state.State.begin: signature") for p in problems)
    assert any(p.startswith("modules.shared_state.State.interrupted: not defined") for p in problems)
    assert sum("cmd_args" in p for p in problems) == 2


def test_binding_kinds_are_module_level_names() -> None:
    for name, entry in load_pin().items():
        if entry["kind"] in BINDING_KINDS:
            assert len(name.split(".")) == 3, name


@needs_webui
def test_the_pin_matches_the_web_uis_source() -> None:
    assert check_source(Path(WEBUI), load_pin(THE_PIN)) == []


@needs_webui
def test_the_pin_matches_the_web_uis_imported_modules(tmp_path: Path) -> None:
    webui = Path(WEBUI)
    python = webui_python(webui)
    script = tmp_path / "check.py"
    script.write_text(check_import_script(webui, THE_PIN, tuple(os.environ.get("SD_WEBUI_ARGS", "").split())))
    result = subprocess.run([python, str(script)], check=False, capture_output=True, text=True, timeout=300)
    line = next((x for x in result.stdout.splitlines() if x.startswith("CONTRACT ")), None)
    assert line is not None, result.stdout[-2000:] + result.stderr[-4000:]
    assert json.loads(line[len("CONTRACT "):]) == []


def webui_python(webui: Path) -> str:
    """``SD_WEBUI_PYTHON``, else the web UI's own venv, else this Python."""
    return os.environ.get("SD_WEBUI_PYTHON") or next(
        (str(p) for p in (webui / "venv" / "bin" / "python", webui / "venv" / "Scripts" / "python.exe") if p.exists()),
        sys.executable)


@needs_a1111
def test_inside_the_web_ui_the_host_callbacks_and_a_tiny_training_work(tmp_path: Path) -> None:
    """The extension installed into a fresh data folder of the real web UI: preload flags, callbacks, the host's
    checkpoint list, progress state, Interrupt, queue lock, settings, the API behind --api-auth, the tab, and a
    tiny training whose checkpoints the web UI lists at once."""
    script = Path(__file__).with_name("a1111_in_host.py")
    result = subprocess.run([webui_python(Path(WEBUI)), str(script), WEBUI, str(REPO), str(tmp_path / "data")],
                            check=False, capture_output=True, text=True, timeout=600)
    assert "IN-HOST OK" in result.stdout, result.stdout[-3000:] + result.stderr[-5000:]


@needs_forge
def test_inside_forge_the_host_callbacks_memory_manager_and_trainings_work(tmp_path: Path) -> None:
    """The extension installed into a fresh data folder of a real Forge (on the CPU: ``SD_WEBUI_ARGS`` is not
    needed): preload flags, callbacks, Forge's dropdown names, progress state, Interrupt, queue, its memory manager
    letting a model go and taking it back, the checkpoint switch Forge loads lazily, the API behind --api-auth, the
    tab, and a tiny training and a tiny LoRA training whose files Forge's checkpoint dropdown and Lora list show."""
    script = Path(__file__).with_name("forge_in_host.py")
    result = subprocess.run([webui_python(Path(WEBUI)), str(script), WEBUI, str(REPO), str(tmp_path / "data")],
                            check=False, capture_output=True, text=True, timeout=600)
    assert "FORGE-IN-HOST OK" in result.stdout, result.stdout[-3000:] + result.stderr[-5000:]


@needs_a1111
def test_the_web_ui_loads_and_samples_the_demo_model_through_our_yaml(tmp_path: Path) -> None:
    """The shipped demo model plus the .yaml our `yaml` command writes: the web UI's own loader builds it and its
    own txt2img (DDIM, CPU) draws what three prompts ask for, as the demo's evaluator scores the pictures."""
    script = Path(__file__).with_name("a1111_demo_in_host.py")
    result = subprocess.run([webui_python(Path(WEBUI)), str(script), WEBUI, str(REPO), str(tmp_path / "data")],
                            check=False, capture_output=True, text=True, timeout=600)
    assert "DEMO-IN-HOST OK" in result.stdout, result.stdout[-3000:] + result.stderr[-5000:]


@needs_a1111
def test_the_web_uis_own_lora_code_patches_in_what_the_engine_merges(tmp_path: Path) -> None:
    """A LoRA the engine trains (UNet and text encoder) into the web UI's Lora folder: listed after
    ``refresh_loras``, and the built-in Lora, asked for it in a txt2img prompt, reads every layer of the file and
    patches W + (alpha / rank) · up @ down into each, as the engine's merge has it (fp16 tolerance)."""
    script = Path(__file__).with_name("a1111_lora_in_host.py")
    result = subprocess.run([webui_python(Path(WEBUI)), str(script), WEBUI, str(REPO), str(tmp_path / "data")],
                            check=False, capture_output=True, text=True, timeout=600)
    assert "LORA-IN-HOST OK" in result.stdout, result.stdout[-3000:] + result.stderr[-5000:]


@needs_a1111
@pytest.mark.parametrize("family", ["sd2", "sd2-v", "sdxl"])
def test_the_web_ui_lists_loads_and_samples_the_families_checkpoints(tmp_path: Path, family: str) -> None:
    """A full-size seeded SD 2.x 512 (epsilon), 768 (v) or SDXL model written by our exporter (SD 2.x: the engine's
    save after one training step): listed by the web UI, built by its own loader from the config it picks (from the
    keys alone for SD 2.x 512 and SDXL; our v2-inference-v.yaml for 768-v), with the right class, family flags and
    parameterization, and its txt2img draws with it (CPU, 64 px, finite latents)."""
    script = Path(__file__).with_name("a1111_families_in_host.py")
    result = subprocess.run([webui_python(Path(WEBUI)), str(script), WEBUI, str(REPO), str(tmp_path / "data"), family],
                            check=False, capture_output=True, text=True, timeout=1200)
    assert "FAMILIES-IN-HOST OK" in result.stdout, result.stdout[-3000:] + result.stderr[-5000:]


@needs_a1111
def test_the_web_uis_own_lora_code_patches_in_an_sdxl_lora_of_ours(tmp_path: Path) -> None:
    """A LoRA our writer makes for a full-size seeded SDXL (UNet and both text encoders, random adapters): the
    built-in Lora matches every key and patches W + (alpha / rank) · up @ down into the very layer it came from."""
    script = Path(__file__).with_name("a1111_sdxl_lora_in_host.py")
    result = subprocess.run([webui_python(Path(WEBUI)), str(script), WEBUI, str(REPO), str(tmp_path / "data")],
                            check=False, capture_output=True, text=True, timeout=1200)
    assert "SDXL-LORA-IN-HOST OK" in result.stdout, result.stdout[-3000:] + result.stderr[-5000:]


ADAPTER_MODULES = {"dreambooth.host.a1111", "dreambooth.host.webui", "dreambooth.extension"}


# ---- a1111.py against the stand-in web UI (runs everywhere; the same checks run inside a real one above) -----

@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """a1111.py imported against tests/fake_webui.py, with two checkpoints in its models folder."""
    from fake_webui import write_fake_webui

    root = write_fake_webui(tmp_path / "webui")
    models = tmp_path / "models"
    (models / "Stable-diffusion" / "sub").mkdir(parents=True)
    (models / "Stable-diffusion" / "base.safetensors").write_bytes(b"x")
    (models / "Stable-diffusion" / "sub" / "other.ckpt").write_bytes(b"x")
    monkeypatch.syspath_prepend(str(root))
    import dreambooth.host

    monkeypatch.delattr(dreambooth.host, "a1111", raising=False)  # else `from dreambooth.host import a1111` reuses it
    monkeypatch.delattr(dreambooth.host, "webui", raising=False)
    for name in [n for n in sys.modules if n == "modules" or n.startswith("modules.") or n in ADAPTER_MODULES]:
        monkeypatch.delitem(sys.modules, name)
    import modules
    from modules import paths, sd_models, shared, shared_state

    paths.models_path = str(models)
    sd_models.model_path = str(models / "Stable-diffusion")
    shared.state = shared_state.State()
    shared.refresh_checkpoints()
    modules.calls.clear()
    from dreambooth.host import a1111

    yield a1111, modules, models
    for name in [n for n in sys.modules if n == "modules" or n.startswith("modules.") or n in ADAPTER_MODULES]:
        del sys.modules[name]
    for name in ("a1111", "webui"):
        if hasattr(dreambooth.host, name):
            delattr(dreambooth.host, name)


def test_the_stand_in_web_ui_honours_the_pin(tmp_path: Path) -> None:
    from fake_webui import write_fake_webui

    assert check_source(write_fake_webui(tmp_path), load_pin()) == []


def test_a1111_lists_and_resolves_the_web_uis_checkpoints(fake) -> None:
    a1111, modules, models = fake
    host = a1111.A1111Host()
    assert host.models_dir == models
    assert host.checkpoint_titles() == ["base.safetensors", "sub/other.ckpt"]
    assert host.checkpoint_file("sub/other.ckpt") == models / "Stable-diffusion" / "sub" / "other.ckpt"
    with pytest.raises(KeyError):
        host.checkpoint_file("missing.safetensors")
    dropdown = type("Dropdown", (), {"choices": []})()
    modules.shared.settings_components["sd_model_checkpoint"] = dropdown
    (models / "Stable-diffusion" / "new.safetensors").write_bytes(b"x")
    host.refresh_checkpoints()
    assert "new.safetensors" in host.checkpoint_titles() and dropdown.choices == host.checkpoint_titles()


def test_a1111_holds_the_queue_and_moves_models_out_and_back(fake) -> None:
    a1111, modules, _ = fake
    sd_models = modules.sd_models
    base = sd_models.checkpoints_list["base.safetensors"]
    other = sd_models.checkpoints_list["sub/other.ckpt"]
    sd_models.model_data.sd_model = sd_models.FakeModel(base)
    sd_models.model_data.loaded_sd_models = [sd_models.model_data.sd_model, sd_models.FakeModel(other)]
    modules.shared.opts.data["sd_model_checkpoint"] = "base.safetensors"
    host = a1111.A1111Host()
    host.unload_model()
    assert not modules.call_queue.queue_lock.acquire(blocking=False)
    assert modules.calls == [("send_model_to_cpu", "base.safetensors"), ("send_model_to_cpu", "sub/other.ckpt"),
                             ("torch_gc",)]
    modules.calls.clear()
    # "Use in txt2img" while training: recorded, not loaded, until the run ends
    assert host.select_checkpoint(other.filename) == "sub/other.ckpt"
    assert ("opts.set", "sd_model_checkpoint", "sub/other.ckpt") not in modules.calls
    assert modules.shared.opts.sd_model_checkpoint == "sub/other.ckpt"
    host.reload_model()
    assert ("reload_model_weights", "sub/other.ckpt") in modules.calls
    assert modules.call_queue.queue_lock.acquire(blocking=False)
    modules.call_queue.queue_lock.release()
    # idle: the web UI's own setting change does the switch; the same model just goes back to the GPU
    modules.calls.clear()
    assert host.select_checkpoint(base.filename) == "base.safetensors"
    assert ("opts.set", "sd_model_checkpoint", "base.safetensors") in modules.calls
    modules.shared.opts.data["sd_model_checkpoint"] = "sub/other.ckpt"
    host.unload_model()
    host.reload_model()
    assert modules.calls[-1] == ("send_model_to_device", "sub/other.ckpt")


def test_a1111_can_keep_the_model_in_vram_when_the_user_says_so(fake) -> None:
    a1111, modules, _ = fake
    modules.sd_models.model_data.sd_model = modules.sd_models.FakeModel(
        modules.sd_models.checkpoints_list["base.safetensors"])
    modules.shared.opts.data["dreambooth_unload_model"] = False
    host = a1111.A1111Host()
    host.unload_model()
    assert modules.calls == [] and not modules.call_queue.queue_lock.acquire(blocking=False)
    host.reload_model()
    assert modules.call_queue.queue_lock.acquire(blocking=False)


def test_a1111_mirrors_progress_and_reads_the_interrupt_button(fake) -> None:
    a1111, modules, _ = fake
    host, state = a1111.A1111Host(), modules.shared.state
    state.interrupt()  # a stale press from an earlier job does not count
    host.job_started("DreamBooth: zwx", 100)
    assert (state.job, state.sampling_steps, host.interrupt_requested()) == ("DreamBooth: zwx", 100, False)
    host.job_progress(7, 100, "step 7/100")
    assert (state.sampling_step, state.textinfo) == (7, "step 7/100")
    state.interrupt()
    assert host.interrupt_requested()
    host.job_finished()
    assert state.job == ""


def test_a1111_refuses_to_switch_under_frozen_settings(fake) -> None:
    a1111, modules, models = fake
    modules.shared.cmd_opts.freeze_settings = True
    with pytest.raises(Exception, match="frozen"):
        a1111.A1111Host().select_checkpoint(models / "Stable-diffusion" / "base.safetensors")


@pytest.fixture
def entry(monkeypatch: pytest.MonkeyPatch):
    """Runs scripts/dreambooth.py as the web UI does (a module object of its own, never in sys.modules) and
    returns the registration module (``extension``) it ran; forgets the package it loaded afterwards."""
    import importlib.util

    def load():
        spec = importlib.util.spec_from_file_location("dreambooth.py", REPO / "scripts" / "dreambooth.py")
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        return sys.modules[f"{script.PACKAGE}.extension"]

    yield load
    for name in [n for n in sys.modules if n == "dreambooth_tab" or n.startswith("dreambooth_tab.")]:
        del sys.modules[name]


def test_a1111_registers_its_callbacks_and_mounts_the_api_behind_api_auth(fake, entry) -> None:
    _, modules, models = fake
    a1111 = entry()
    callbacks = modules.script_callbacks.callback_map
    assert callbacks["callbacks_ui_tabs"] == [a1111.ui_tabs]
    assert callbacks["callbacks_app_started"] == [a1111.app_started]
    assert callbacks["callbacks_ui_settings"] == [a1111.ui_settings]
    supervisor = a1111.supervisor()
    assert type(supervisor.host).__name__ == "A1111Host"  # no modules_forge here: the web UI's adapter
    assert supervisor.dreambooth_dir == models / "dreambooth"
    assert supervisor.checkpoints_dir == models / "Stable-diffusion" and a1111.supervisor() is supervisor

    from fastapi import FastAPI

    modules.shared.cmd_opts.api_auth = "alice:pw"
    app = FastAPI()
    a1111.app_started(None, app)
    assert app.routes  # mounted; its 401 without credentials is tested over HTTP in test_api.py
    modules.shared.cmd_opts.dreambooth_no_api = True
    app = FastAPI()
    a1111.app_started(None, app)
    assert list(app.openapi()["paths"]) == ["/dreambooth/internal/checkpoints"]  # the pages' watch only, no API


def test_the_extension_and_another_package_named_dreambooth_both_load(
    fake, entry, tmp_path, monkeypatch, request
) -> None:
    """d8ahazard's extension is a package named ``dreambooth``; in either load order each keeps its own code."""
    other = tmp_path / "incumbent" / "dreambooth"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("OWNER = 'incumbent'\n")
    (other / "shared.py").write_text("status = 'idle'\n")
    ours = [n for n in sys.modules if n == "dreambooth" or n.startswith("dreambooth.")]
    for name in ours:
        monkeypatch.delitem(sys.modules, name)  # this test session's own import of our package, restored after

    def forget_the_stand_in() -> None:  # its modules under names ours did not have (monkeypatch restores ours)
        for name in [n for n in sys.modules if n.split(".")[0] == "dreambooth" and n not in ours]:
            del sys.modules[name]

    request.addfinalizer(forget_the_stand_in)
    monkeypatch.syspath_prepend(str(other.parent))
    modules = fake[1]

    def incumbent_works() -> bool:
        from dreambooth import shared

        return sys.modules["dreambooth"].OWNER == "incumbent" and shared.status == "idle"

    import dreambooth  # the incumbent first ...

    assert dreambooth.OWNER == "incumbent"
    a1111 = entry()  # ... then us
    assert modules.script_callbacks.callback_map["callbacks_ui_tabs"][-1] == a1111.ui_tabs
    assert a1111.supervisor().host.checkpoint_titles() == ["base.safetensors", "sub/other.ckpt"]
    assert incumbent_works()

    for name in [n for n in sys.modules if n.split(".")[0] in ("dreambooth", "dreambooth_tab")]:
        del sys.modules[name]
    a1111 = entry()  # us first ...
    assert "dreambooth" not in sys.modules
    assert incumbent_works()  # ... then the incumbent
    assert a1111.supervisor().host.checkpoint_titles() == ["base.safetensors", "sub/other.ckpt"]


def test_preload_adds_the_flags() -> None:
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("dreambooth_preload", REPO / "preload.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = argparse.ArgumentParser()
    module.preload(parser)
    args = parser.parse_args(["--dreambooth-dir", "D", "--dreambooth-python", "P", "--dreambooth-no-api"])
    assert (args.dreambooth_dir, args.dreambooth_python, args.dreambooth_no_api) == ("D", "P", True)
    assert parser.parse_args([]).dreambooth_dir is None


def test_every_name_the_web_uis_own_lookup_accepts_is_a_source_checkpoint(fake, tmp_path: Path) -> None:
    """Once the web UI has loaded a checkpoint its title carries the short hash; every other name its
    closest-checkpoint lookup (``get_closet_checkpoint_match``, pinned) takes for it still names it."""
    from dreambooth.supervisor import Supervisor

    a1111, modules, models = fake
    info = modules.sd_models.checkpoints_list["sub/other.ckpt"]
    short = info.calculate_shorthash()  # what the web UI does when it first loads the checkpoint
    host = a1111.A1111Host()
    assert host.checkpoint_titles() == ["base.safetensors", f"sub/other.ckpt [{short}]"]
    supervisor = Supervisor(host, tmp_path / "dreambooth", models / "Stable-diffusion")
    other = models / "Stable-diffusion" / "sub" / "other.ckpt"
    names = [f"sub/other.ckpt [{short}]", "sub/other.ckpt", "other.ckpt", "other", f"other [{short}]", short,
             info.sha256, info.hash, "sub_other", f"sub/other.ckpt [{info.hash}]"]
    for i, name in enumerate(names):
        config = supervisor.create_model(f"m{i}", name)
        assert config.source_checkpoint == str(other), name
    with pytest.raises(Exception, match="neither a listed checkpoint"):
        supervisor.create_model("nothing", "missing.safetensors")
