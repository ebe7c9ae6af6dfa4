"""Run by the web UI at every start (``python install.py``): add what DreamBooth needs, change nothing else.

Only missing packages are installed, and the installed versions of torch, torchvision, xformers, transformers,
accelerate, safetensors, gradio, fastapi, pydantic, numpy, Pillow (and a few more) are given to pip as
constraints, so pip fails rather than upgrade, downgrade or reinstall any of them. When nothing is missing this
script only reads package metadata: no pip, no imports of torch. When pip fails (no network, a conflict) the web
UI still starts and the DreamBooth tab says what is missing.

An installed diffusers or peft is kept as it is, even one that cannot import here (the tab then says why): the web
UI may have installed it itself (Forge pins peft 0.13.2). The peft range follows transformers and accelerate, see
``dependencies.peft_requirement``.

Optional packages (bitsandbytes) are installed only when named in ``DREAMBOOTH_INSTALL_OPTIONAL``
(comma-separated). pip's own environment variables (``PIP_INDEX_URL``, ``PIP_FIND_LINKS``, ``PIP_NO_INDEX`` …) apply.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dreambooth.host import dependencies

PIP_TIMEOUT_S = 15


def main() -> int:
    """Install what is missing; always 0 so that the web UI starts whatever happens."""
    missing = dependencies.missing_requirements()
    wanted = [item.requirement for item in missing if item.installable]
    optional = [name.strip() for name in os.environ.get("DREAMBOOTH_INSTALL_OPTIONAL", "").split(",") if name.strip()]
    wanted += [name for name in optional if name in dependencies.optional_missing()]
    for item in missing:
        if not item.installable:
            print(f"DreamBooth: {item.name}: {item.reason}.")
    if not wanted:
        return 0
    print(f"DreamBooth: installing {', '.join(wanted)} (the web UI's own packages stay as they are)")
    with tempfile.TemporaryDirectory(prefix="dreambooth-install-") as folder:
        constraints = Path(folder) / "constraints.txt"
        constraints.write_text("\n".join(dependencies.constraints()) + "\n", encoding="utf-8")
        command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
                   "--prefer-binary", "--retries", "1", "--timeout", str(PIP_TIMEOUT_S), "-c", str(constraints),
                   *wanted]
        result = subprocess.run(command, check=False, capture_output=True, text=True, encoding="utf-8",
                                errors="replace")
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-6:])
        print(f"DreamBooth: could not install {', '.join(wanted)}; the web UI starts without them and the DreamBooth "
              f"tab explains what is missing. pip said:\n{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
