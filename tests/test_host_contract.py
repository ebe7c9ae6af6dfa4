"""The contract with the web UI: every ``modules.*`` name a1111.py uses is pinned with its signature, the pin is
checked against the code here, and against a real web UI when ``SD_WEBUI_DIR`` names one (its source, and its
modules imported by its own Python: ``SD_WEBUI_PYTHON``, default ``$SD_WEBUI_DIR/venv/bin/python``)."""

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
    A1111,
    BINDING_KINDS,
    REPO,
    check_import_script,
    check_source,
    load_pin,
    used_names,
)

WEBUI = os.environ.get("SD_WEBUI_DIR")
needs_webui = pytest.mark.skipif(not WEBUI, reason="set SD_WEBUI_DIR to a web UI checkout to run")


def test_every_modules_name_a1111_uses_is_pinned_and_called_as_pinned() -> None:
    uses = used_names(load_pin())
    assert len(uses) > 30
    problems = [p for use in uses for p in use.problems]
    assert problems == []


def test_every_pinned_name_is_used_by_a1111() -> None:
    pin = load_pin()
    visited = {name for use in used_names(pin) for name in use.visited}
    source = A1111.read_text(encoding="utf-8")
    unused = []
    for name, entry in pin.items():
        if entry.get("indirect"):
            if not re.search(rf"\.{re.escape(name.rsplit('.', 1)[1])}\b", source):
                unused.append(name)
        elif name not in visited:
            unused.append(name)
    assert unused == [], "pinned but not used by a1111.py: remove them from tests/host_contract.json"


def test_only_a1111_imports_the_web_uis_modules() -> None:
    files = [*(REPO / "dreambooth").rglob("*.py"), *(REPO / "scripts").glob("*.py"), REPO / "preload.py",
             REPO / "install.py"]
    importers = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            if any(n == "modules" or n.startswith("modules.") for n in names):
                importers.add(path.relative_to(REPO).as_posix())
    assert importers == {"dreambooth/host/a1111.py"}


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
    assert check_source(Path(WEBUI), load_pin()) == []


@needs_webui
def test_the_pin_matches_the_web_uis_imported_modules(tmp_path: Path) -> None:
    webui = Path(WEBUI)
    python = webui_python(webui)
    script = tmp_path / "check.py"
    script.write_text(check_import_script(webui))
    result = subprocess.run([python, str(script)], check=False, capture_output=True, text=True, timeout=300)
    line = next((x for x in result.stdout.splitlines() if x.startswith("CONTRACT ")), None)
    assert line is not None, result.stdout[-2000:] + result.stderr[-4000:]
    assert json.loads(line[len("CONTRACT "):]) == []


def webui_python(webui: Path) -> str:
    """``SD_WEBUI_PYTHON``, else the web UI's own venv, else this Python."""
    return os.environ.get("SD_WEBUI_PYTHON") or next(
        (str(p) for p in (webui / "venv" / "bin" / "python", webui / "venv" / "Scripts" / "python.exe") if p.exists()),
        sys.executable)


@needs_webui
def test_inside_the_web_ui_the_host_callbacks_and_a_tiny_training_work(tmp_path: Path) -> None:
    """The extension installed into a fresh data folder of the real web UI: preload flags, callbacks, the host's
    checkpoint list, progress state, Interrupt, queue lock, settings, the API behind --api-auth, the tab, and a
    tiny training whose checkpoints the web UI lists at once."""
    script = Path(__file__).with_name("a1111_in_host.py")
    result = subprocess.run([webui_python(Path(WEBUI)), str(script), WEBUI, str(REPO), str(tmp_path / "data")],
                            check=False, capture_output=True, text=True, timeout=600)
    assert "IN-HOST OK" in result.stdout, result.stdout[-3000:] + result.stderr[-5000:]
