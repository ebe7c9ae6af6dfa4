"""A host without a web UI, for ``python -m dreambooth ui``: checkpoints are the files under
``<models>/Stable-diffusion``, there is no model in memory to unload, and progress lives only in the tab.

On a models folder with no checkpoint yet, the app offers the shipped demo model (:func:`install_demo_model`).
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

from ..errors import ModelFormatError
from ..fileio import write_atomic
from .lookup import CHECKPOINT_SUFFIXES, checkpoint_titles, closest_checkpoint

DEMO_CHECKPOINT = Path(__file__).resolve().parents[1] / "demo" / "model" / "shapes-sd1.safetensors"
DEMO_TITLE = "dreambooth-demo/shapes-sd1.safetensors"
"""Where the demo model goes under ``<models>/Stable-diffusion``, as the app lists it."""


def install_demo_model(checkpoints_dir: Path, tokenizer_dir: str = "") -> Path | None:
    """Copy the demo model to ``<checkpoints_dir>/dreambooth-demo/`` when the folder holds no checkpoint at all.

    The web UI's ``.yaml`` (and the text-encoder folder it names) is written first and the checkpoint appears
    whole (copied under a temporary name, then renamed), so it is never listed without its yaml. Nothing is ever
    overwritten, and a folder that already has checkpoints (the user's, or the demo model) is left as it is.
    Returns the installed file, or None when nothing was installed.
    """
    checkpoints_dir = Path(checkpoints_dir)
    if checkpoints_dir.is_dir() and any(
        p.suffix.lower() in CHECKPOINT_SUFFIXES and p.is_file() for p in checkpoints_dir.rglob("*")
    ):
        return None
    target = checkpoints_dir / DEMO_TITLE
    from ..models.host_yaml import write_host_yaml
    from ..models.load import embedded_config

    configs = embedded_config(DEMO_CHECKPOINT)
    if configs is not None and not target.with_suffix(".yaml").exists():
        try:
            write_host_yaml(target, configs, tokenizer_dir=tokenizer_dir)
        except ModelFormatError:
            pass  # no CLIP tokenizer here: the yaml only serves the web UI; the app and the engine do without it
    return write_atomic(target, lambda temp: shutil.copyfile(DEMO_CHECKPOINT, temp))


class StandaloneHost:
    """The :class:`~dreambooth.host.base.Host` of the standalone app."""

    checkpoint_refresh_element: str | None = None
    """The app's page has no txt2img dropdown to re-list."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = Path(models_dir)
        self.checkpoints_dir = self.models_dir / "Stable-diffusion"
        self.loras_dir = self.models_dir / "Lora"
        self.selected: Path | None = None
        """The checkpoint last picked with "Use in txt2img" (there is no txt2img here; it is only remembered)."""
        self.job: tuple[str, int, int, str] | None = None
        """``(title, step, total, text)`` of the running job, for logs and tests."""
        self._lock = threading.Lock()
        self._titles: dict[str, Path] = {}
        self.refresh_checkpoints()

    def checkpoint_titles(self) -> list[str]:
        """Paths of the checkpoint files relative to ``<models>/Stable-diffusion``, '/'-separated, sorted."""
        with self._lock:
            return list(self._titles)

    def checkpoint_file(self, name: str) -> Path:
        """The file behind any name the web UI's lookup would accept (a title, with or without a hash, the file
        name, the name without extension, a hash …: see ``host/lookup.py``); ``KeyError`` for an unknown one."""
        with self._lock:
            titles = dict(self._titles)
        found = closest_checkpoint(name, titles)
        if found is None:
            raise KeyError(name)
        return found

    def refresh_checkpoints(self) -> None:
        """Re-scan ``<models>/Stable-diffusion``."""
        found = checkpoint_titles(self.checkpoints_dir)
        with self._lock:
            self._titles = found

    def refresh_loras(self) -> None:
        """Nothing: the standalone app lists no LoRAs."""

    def unload_model(self) -> None:
        """Nothing is loaded here."""

    def reload_model(self) -> None:
        """Nothing to bring back."""

    def job_started(self, title: str, total_steps: int) -> None:
        """Remember the job (the tab shows progress itself)."""
        self.job = (title, 0, total_steps, "")

    def job_progress(self, step: int, total: int, text: str) -> None:
        """Remember the job's progress."""
        title = self.job[0] if self.job else ""
        self.job = (title, step, total, text)

    def job_finished(self) -> None:
        """Forget the job."""
        self.job = None

    def interrupt_requested(self) -> bool:
        """There is no Interrupt button outside the tab."""
        return False

    def select_checkpoint(self, path: Path) -> str:
        """Remember ``path`` and return its title (there is no txt2img to switch)."""
        self.refresh_checkpoints()
        self.selected = Path(path)
        try:
            return Path(path).resolve().relative_to(self.checkpoints_dir.resolve()).as_posix()
        except ValueError:
            return Path(path).name
