"""install.py adds only what is missing and never changes the web UI's packages, even when pip would like to.

The tests build a virtual environment holding the web UI's pinned distributions (as small local wheels of the
same names and versions) and let pip install from a local wheel folder only (``PIP_NO_INDEX``), so nothing is
downloaded. ``pip freeze`` before and after must differ only by the packages that were missing.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HOST_PINS = {"torch": "2.13.0", "transformers": "4.30.2", "accelerate": "0.21.0", "safetensors": "0.4.2",
             "numpy": "1.26.2", "Pillow": "9.5.0", "gradio": "3.41.2", "fastapi": "0.94.0", "pydantic": "1.10.27"}
FORGE_PINS = {"torch": "2.14.1", "transformers": "4.46.1", "accelerate": "0.31.0", "safetensors": "0.4.2",
              "numpy": "1.26.2", "Pillow": "9.5.0", "gradio": "4.40.0", "fastapi": "0.104.1", "pydantic": "2.8.2",
              "huggingface-hub": "0.26.2", "diffusers": "0.31.0", "peft": "0.13.2"}
"""Forge's ``requirements_versions.txt`` (it installs peft 0.13.2 itself), torch as its venv has it."""


def build_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A minimal pure-Python wheel named like the real distribution."""
    module = name.lower().replace("-", "_")
    dist_info = f"{module}-{version}.dist-info"
    files = {
        f"{module}_stub/__init__.py": f"VERSION = {version!r}\n",
        f"{dist_info}/METADATA": "Metadata-Version: 2.1\n"
                                 f"Name: {name}\nVersion: {version}\n"
                                 + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist_info}/RECORD"] = "\n".join(record + [f"{dist_info}/RECORD,,"]) + "\n"
    wheel = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


@pytest.fixture(scope="module")
def host_venv(tmp_path_factory) -> Path:
    """A venv with the web UI's pins installed (as local stand-in wheels); returns its python."""
    root = tmp_path_factory.mktemp("install")
    pins = root / "pins"
    pins.mkdir()
    for name, version in HOST_PINS.items():
        build_wheel(pins, name, version)
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    python = root / "venv" / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index",
                    "--find-links", str(pins), *(f"{n}=={v}" for n, v in HOST_PINS.items())], check=True)
    return python


def offer_peft(wheels: Path) -> None:
    """What the index offers of peft: the newest that imports beside the A1111 pins (0.13.2) and two newer ones
    whose metadata those pins satisfy just as well (peft declares no transformers bound, and accelerate>=0.21.0)
    but which fail to import there: only the extension's range keeps pip from choosing 0.21.2."""
    for version, hub in (("0.13.2", "0.17.0"), ("0.14.0", "0.25.0"), ("0.21.2", "0.25.0")):
        build_wheel(wheels, "peft", version, ("torch>=1.13.0", "accelerate>=0.21.0", "transformers", "safetensors",
                                              "numpy>=1.17", f"huggingface-hub>={hub}"))


def freeze(python: Path) -> set[str]:
    out = subprocess.run([str(python), "-m", "pip", "freeze", "--disable-pip-version-check"], check=True,
                         capture_output=True, text=True).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def run_install(python: Path, wheels: Path, extra_env: dict[str, str] | None = None) -> tuple[str, float]:
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels), **(extra_env or {})}
    env.pop("PYTHONPATH", None)
    start = time.perf_counter()
    result = subprocess.run([str(python), str(REPO / "install.py")], check=False, env=env, capture_output=True,
                            text=True, cwd=str(wheels))
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr, elapsed


def uninstall(python: Path, *names: str) -> None:
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", *names], check=True)


def test_installs_only_the_missing_diffusers_that_fits_and_nothing_on_the_second_start(host_venv, tmp_path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    # what an index offers: the right diffusers, a newer one that would not import, newer pins, hub 0.x and 1.x
    build_wheel(wheels, "diffusers", "0.31.0", ("numpy", "safetensors>=0.3.1", "huggingface-hub>=0.23.2"))
    build_wheel(wheels, "diffusers", "0.37.0", ("numpy", "safetensors>=0.3.1", "huggingface-hub>=0.23.2"))
    build_wheel(wheels, "huggingface-hub", "0.36.0")
    build_wheel(wheels, "huggingface-hub", "1.2.0")
    build_wheel(wheels, "numpy", "2.4.0")
    build_wheel(wheels, "safetensors", "0.7.0")
    offer_peft(wheels)
    before = freeze(host_venv)
    output, _ = run_install(host_venv, wheels)
    after = freeze(host_venv)
    assert "installing diffusers==0.31.0, peft>=0.10,<0.14" in output
    assert after - before == {"diffusers==0.31.0", "huggingface-hub==0.36.0", "peft==0.13.2"}
    assert before - after == set()

    # second start: pip is not even called (a stand-in pip on the path would leave a mark) and it is quick
    shadow = tmp_path / "shadow"
    (shadow / "pip").mkdir(parents=True)
    (shadow / "pip" / "__init__.py").write_text("")
    (shadow / "pip" / "__main__.py").write_text(f"open({str(tmp_path / 'pip-was-called')!r}, 'w').close()\n")
    output, elapsed = run_install(host_venv, wheels, {"PYTHONPATH": str(shadow)})
    assert output == "" and not (tmp_path / "pip-was-called").exists()
    assert freeze(host_venv) == after
    print(f"second start of install.py: {elapsed * 1000:.0f} ms (including the Python start-up)")
    assert elapsed < 3.0
    uninstall(host_venv, "diffusers", "huggingface-hub", "peft")


def test_a_diffusers_that_needs_newer_pins_is_refused_not_forced(host_venv, tmp_path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    build_wheel(wheels, "diffusers", "0.31.0", ("numpy>=2", "huggingface-hub>=0.23.2"))
    build_wheel(wheels, "huggingface-hub", "0.36.0")
    build_wheel(wheels, "numpy", "2.4.0")
    offer_peft(wheels)
    before = freeze(host_venv)
    output, _ = run_install(host_venv, wheels)
    assert freeze(host_venv) == before
    assert "could not install diffusers==0.31.0" in output and "tab explains what is missing" in output


def test_without_network_the_web_ui_still_starts(host_venv, tmp_path) -> None:
    empty = tmp_path / "offline"
    empty.mkdir()
    before = freeze(host_venv)
    output, _ = run_install(host_venv, empty)
    assert freeze(host_venv) == before and "could not install" in output


def test_optional_packages_only_on_request(host_venv, tmp_path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    build_wheel(wheels, "diffusers", "0.31.0")
    build_wheel(wheels, "bitsandbytes", "0.45.0", ("torch",))
    build_wheel(wheels, "peft", "0.13.2", ("torch>=1.13.0", "accelerate>=0.21.0"))
    before = freeze(host_venv)
    run_install(host_venv, wheels)
    assert freeze(host_venv) - before == {"diffusers==0.31.0", "peft==0.13.2"}
    run_install(host_venv, wheels, {"DREAMBOOTH_INSTALL_OPTIONAL": "bitsandbytes"})
    assert freeze(host_venv) - before == {"diffusers==0.31.0", "peft==0.13.2", "bitsandbytes==0.45.0"}
    uninstall(host_venv, "diffusers", "peft", "bitsandbytes")


def test_an_installed_peft_is_kept_and_one_that_cannot_import_is_reported(host_venv, tmp_path) -> None:
    """The web UI may install peft itself (Forge pins 0.13.2): it is never reinstalled, not even when it cannot
    import (then the tab says why)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    build_wheel(wheels, "diffusers", "0.31.0")
    offer_peft(wheels)
    before = freeze(host_venv)
    for installed, said in (("0.14.0", "peft 0.14.0 cannot import beside transformers 4.30.2"), ("0.13.2", None)):
        subprocess.run([str(host_venv), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index",
                        "--no-deps", "--find-links", str(wheels), f"peft=={installed}"], check=True)
        output, _ = run_install(host_venv, wheels)
        assert freeze(host_venv) - before == {"diffusers==0.31.0", f"peft=={installed}"}
        assert "installing diffusers==0.31.0 (" in output and "installing diffusers==0.31.0," not in output
        assert (said in output) if said else ("peft" not in output), output
        uninstall(host_venv, "diffusers")
    uninstall(host_venv, "peft")


def test_in_this_profile_nothing_is_installed_and_pip_is_not_called(tmp_path) -> None:
    """The test environment has diffusers that fits: install.py must not call pip in it."""
    shadow = tmp_path / "shadow" / "pip"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    (shadow / "__main__.py").write_text(f"open({str(tmp_path / 'pip-was-called')!r}, 'w').close()\n")
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path), "PYTHONPATH": str(shadow.parent)}
    result = subprocess.run([sys.executable, str(REPO / "install.py")], check=False, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0 and "installing" not in result.stdout, result.stdout
    assert not (tmp_path / "pip-was-called").exists()


def test_the_peft_rule_follows_transformers_and_accelerate() -> None:
    from dreambooth.host.dependencies import peft_conflict, peft_requirement

    a1111, forge = HOST_PINS, FORGE_PINS
    assert peft_requirement(a1111["transformers"], a1111["accelerate"]) == "peft>=0.10,<0.14"
    assert peft_requirement(forge["transformers"], forge["accelerate"]) == "peft>=0.10,<0.15"
    assert peft_requirement("5.24.0", "1.16.0") == "peft>=0.18,<0.22"
    assert peft_requirement(None, None) == "peft>=0.10,<0.14"
    # what imports is kept; only a known failure is a conflict (0.14: transformers 4.43, 0.15: accelerate 0.32)
    assert peft_conflict("0.13.2", a1111["transformers"], a1111["accelerate"]) is None
    assert peft_conflict("0.13.2", forge["transformers"], forge["accelerate"]) is None
    assert peft_conflict("0.14.0", forge["transformers"], forge["accelerate"]) is None
    assert "transformers.EncoderDecoderCache" in peft_conflict("0.14.0", "4.42.4", "0.31.0")
    assert "clear_device_cache" in peft_conflict("0.15.2", forge["transformers"], forge["accelerate"])
    assert peft_conflict("0.17.1", "4.46.1", "0.32.0") is None
    assert "0.18 or newer" in peft_conflict("0.13.2", "5.24.0", "1.16.0")
    assert peft_conflict("0.21.2", "5.24.0", "1.16.0") is None and peft_conflict("0.23.0", "5.24.0", "1.16.0") is None


@pytest.mark.parametrize("peft", [None, "0.13.2", "0.15.2"])
def test_on_forge_its_own_peft_counts_and_nothing_is_reinstalled(monkeypatch, peft) -> None:
    from dreambooth.host import dependencies

    pins = {**FORGE_PINS, "peft": peft}
    monkeypatch.setattr(dependencies, "installed_version", lambda name: pins.get(name))
    missing = {item.name: item for item in dependencies.missing_requirements()}
    assert set(missing) == ({"peft"} if peft != "0.13.2" else set())
    if peft is None:
        assert missing["peft"].requirement == "peft>=0.10,<0.15" and missing["peft"].installable
    elif peft == "0.15.2":
        assert not missing["peft"].installable and "accelerate 0.31.0" in missing["peft"].reason


def test_the_diffusers_rule_follows_transformers() -> None:
    from dreambooth.host.dependencies import diffusers_requirement, version_tuple

    assert diffusers_requirement("4.30.2") == "diffusers==0.31.0"
    assert diffusers_requirement("4.37.0") == "diffusers" and diffusers_requirement("5.24.0") == "diffusers"
    assert version_tuple("2.13.0+cpu") == (2, 13, 0) and version_tuple("1.0.0rc1") == (1, 0, 0)
