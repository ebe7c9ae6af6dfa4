"""What the extension needs beside the web UI's own packages, what is missing, and how to install it safely.

The web UI re-installs its own pins at every start, so the extension must change none of them: packages are
only ever *added*, with every version the web UI already has given to pip as a constraint. Checking uses
``importlib.metadata`` only (no imports of torch & co.), so a start with nothing missing costs milliseconds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata

PROTECTED = ("torch", "torchvision", "torchaudio", "xformers", "transformers", "accelerate", "safetensors",
             "gradio", "gradio_client", "fastapi", "starlette", "pydantic", "pydantic_core", "numpy", "Pillow",
             "huggingface-hub", "tokenizers")
"""Never installed, upgraded or downgraded by us: the installed version of each is a pip constraint."""

FROM_THE_HOST = {"torch": "torch", "transformers": "transformers", "safetensors": "safetensors", "numpy": "numpy",
                 "Pillow": "PIL", "fastapi": "fastapi", "gradio": "gradio"}
"""Needed, but the web UI brings them: reported when absent, never installed."""

OPTIONAL = {"bitsandbytes": "the 8-bit AdamW optimizer (CUDA)", "xformers": "xformers attention"}
"""Used when present; the tab shows the option disabled, with this reason, when absent."""

SIGLIP_TRANSFORMERS = (4, 37)
"""diffusers ≥ 0.32 imports ``SiglipImageProcessor``, which transformers has from 4.37 on."""


@dataclass(frozen=True)
class Missing:
    """One package the extension needs that is not usable now."""

    name: str
    requirement: str
    reason: str
    installable: bool


def installed_version(name: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def version_tuple(version: str) -> tuple[int, ...]:
    """``"4.30.2"`` → ``(4, 30, 2)``; ``"2.13.0+cpu"`` → ``(2, 13, 0)``; pre-release tags are ignored."""
    numbers = []
    for part in re.split(r"[.+-]", version):
        match = re.match(r"\d+", part)
        if not match:
            break
        numbers.append(int(match.group()))
    return tuple(numbers)


def diffusers_requirement(transformers_version: str | None) -> str:
    """The diffusers that imports beside the installed transformers: 0.31.0 before transformers 4.37."""
    if transformers_version is not None and version_tuple(transformers_version) < SIGLIP_TRANSFORMERS:
        return "diffusers==0.31.0"
    return "diffusers"


PEFT_CEILINGS = (((0, 14), "transformers", (4, 43), "transformers.EncoderDecoderCache"),
                 ((0, 15), "accelerate", (0, 32), "accelerate.utils.memory.clear_device_cache"))
"""``(first peft, package, first version of it, name)``: peft from *first peft* on imports *name* at its top level,
which *package* has from *first version* on (checked in the wheels: EncoderDecoderCache came with transformers
4.43, clear_device_cache with accelerate 0.32). Below that version every such peft fails to import."""

PEFT_TRANSFORMERS_4 = ((0, 10), (0, 15))
"""The peft range for transformers 4 where no ceiling applies: 0.14.0 is the newest verified there (Forge's
transformers 4.46.1 and accelerate 0.31.0, which stop 0.15 on); 0.10 is the oldest verified with DoRA on Conv2d."""

PEFT_TRANSFORMERS_5 = ((0, 18), (0, 22))
"""transformers 5 and diffusers 0.42: peft 0.17 imports ``transformers.HybridCache`` (gone in 5), diffusers 0.42
imports ``peft.helpers.disable_input_dtype_casting`` (0.18 on); 0.21.2 is the newest verified."""


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def peft_requirement(transformers_version: str | None, accelerate_version: str | None) -> str:
    """The peft pip may install beside the installed transformers and accelerate: ``peft>=0.10,<0.14`` for the
    A1111 1.10 pins (transformers 4.30.2, accelerate 0.21.0), ``peft>=0.10,<0.15`` for Forge's (4.46.1, 0.31.0),
    ``peft>=0.18,<0.22`` for transformers 5."""
    installed = {"transformers": version_tuple(transformers_version or "0"),
                 "accelerate": version_tuple(accelerate_version or "0")}
    if installed["transformers"] >= (5,):
        low, high = PEFT_TRANSFORMERS_5
    else:
        low, high = PEFT_TRANSFORMERS_4
        for first, package, needed, _ in PEFT_CEILINGS:
            if installed[package] < needed:
                high = min(high, first)
    return f"peft>={_dotted(low)},<{_dotted(high)}"


def peft_conflict(peft_version: str, transformers_version: str | None, accelerate_version: str | None) -> str | None:
    """Why the installed peft cannot import here, or None. Only a known failure counts: a peft outside the range
    that :func:`peft_requirement` would install, but not known to fail (say, one newer than any verified), is kept;
    the web UI may have installed it itself (Forge pins peft 0.13.2), and it is never reinstalled."""
    peft = version_tuple(peft_version)
    installed = {"transformers": (transformers_version, version_tuple(transformers_version or "0")),
                 "accelerate": (accelerate_version, version_tuple(accelerate_version or "0"))}
    low = PEFT_TRANSFORMERS_5[0]
    if installed["transformers"][1] >= (5,) and peft < low:
        return (f"peft {peft_version} cannot run beside transformers {transformers_version} and its diffusers "
                f"(it needs peft {_dotted(low)} or newer)")
    for first, package, needed, name in PEFT_CEILINGS:
        version, parsed = installed[package]
        if peft >= first and parsed < needed:
            return (f"peft {peft_version} cannot import beside {package} {version or '(absent)'}: from "
                    f"{_dotted(first)} on it imports {name}, which needs {package} {_dotted(needed)} or newer")
    return None


def missing_requirements() -> list[Missing]:
    """Everything needed that is absent (or, for diffusers and peft, of a version that cannot import here). An
    installed diffusers or peft is never offered for reinstalling: the web UI may own it."""
    missing = [Missing(name, name, "not installed; the web UI normally brings it", False)
               for name in FROM_THE_HOST if installed_version(name) is None]
    transformers = installed_version("transformers")
    diffusers = installed_version("diffusers")
    wanted = diffusers_requirement(transformers)
    if diffusers is None:
        missing.append(Missing("diffusers", wanted, "not installed", True))
    elif wanted.endswith("0.31.0") and version_tuple(diffusers) >= (0, 32):
        missing.append(Missing("diffusers", wanted, f"diffusers {diffusers} cannot import beside transformers "
                               f"{transformers} (it needs 4.37 or newer)", False))
    peft, accelerate = installed_version("peft"), installed_version("accelerate")
    wanted_peft = peft_requirement(transformers, accelerate)
    if peft is None:
        missing.append(Missing("peft", wanted_peft, "not installed (LoRA training needs it)", True))
    elif (conflict := peft_conflict(peft, transformers, accelerate)) is not None:
        missing.append(Missing("peft", wanted_peft, conflict, False))
    return missing


def constraints() -> list[str]:
    """``name==version`` of every protected package that is installed, plus ``huggingface-hub<1.0`` where
    transformers 4 is installed and the hub is not (transformers 4 refuses hub 1.x)."""
    lines = [f"{name}=={version}" for name in PROTECTED if (version := installed_version(name)) is not None]
    transformers = installed_version("transformers")
    if installed_version("huggingface-hub") is None and transformers and version_tuple(transformers) < (5,):
        lines.append("huggingface-hub<1.0")
    return lines


def optional_missing() -> dict[str, str]:
    """Optional packages that are absent, with what they would enable."""
    return {name: what for name, what in OPTIONAL.items() if installed_version(name) is None}


def describe(missing: list[Missing]) -> str:
    """A short Markdown explanation for the tab when the extension cannot run."""
    lines = ["DreamBooth cannot start: some packages it needs are missing or unusable.", ""]
    for item in missing:
        fix = ("`install.py` installs it at the next start of the web UI (that needs a network connection), or run "
               f"`python -m pip install \"{item.requirement}\"` in the web UI's environment"
               if item.installable else "install a version that fits, or update the web UI")
        lines.append(f"- **{item.name}**: {item.reason}; {fix}.")
    return "\n".join(lines)
