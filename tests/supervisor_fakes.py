"""Test doubles for the supervisor: a host that records what it was asked, and a scripted training child.

The scripted child stands in for ``python -m dreambooth train <config> --json``: it reads the config, prints the
events ``events.py`` documents, honours ``cancel.request`` after each step and writes checkpoints atomically,
like the engine's contract says. ``FAKE_ENGINE_MODE`` picks a behaviour: ``train`` (default), ``error``,
``crash``, ``stubborn`` (ignores cancel requests).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

FAKE_ENGINE = r'''
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, REPOSITORY)
from dreambooth.config import TrainConfig, validate_for_training

def emit(_kind, **fields):
    print(json.dumps({"event": _kind, "time": time.time(), **fields}), flush=True)

config_path = Path(sys.argv[sys.argv.index("train") + 1])
assert "--json" in sys.argv and "--cancel-on-stdin-eof" in sys.argv, sys.argv
config = json.loads(config_path.read_text(encoding="utf-8"))
model_dir = config_path.parent
out = Path(config["output_dir"])
mode = os.environ.get("FAKE_ENGINE_MODE", "train")
delay = float(os.environ.get("FAKE_ENGINE_DELAY", "0.01"))
total = config["max_steps"]
print("some library chatter that is not JSON", flush=True)
emit("started", model=config["model_name"], total_steps=total, resumed_from=0)
emit("status", message="loading the model")
if mode == "error":
    emit("error", kind="DatasetError", message="No images in /nowhere.", advice="Add photos.")
    sys.exit(1)
if mode == "crash":
    print("Traceback (most recent call last):\nRuntimeError: boom", file=sys.stderr, flush=True)
    sys.exit(3)
for warning in validate_for_training(TrainConfig.from_dict(config)):  # as engine.run does: the start warned too
    emit("warning", message=warning)
emit("warning", message="a warning from the engine")
saved = []
for step in range(1, total + 1):
    time.sleep(delay)
    emit("step", step=step, total=total, loss=1.0 / step, lr=1e-6, it_per_s=10.0, eta_s=(total - step) / 10,
         memory_mb=123.0)
    if config["save_every"] and step % config["save_every"] == 0 or step == total:
        path = out / f"{config['model_name']}_{step}.safetensors"
        out.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(path.name + ".partial")
        temp.write_bytes(b"weights")
        os.replace(temp, path)
        saved.append(str(path))
        kind = {"kind": "lora"} if config.get("method") == "lora" else {}
        emit("checkpoint_saved", path=str(path), step=step, **kind)
    if step == 2:
        emit("sample", paths=[str(model_dir / "samples" / "s2.png")], step=step)
    request = model_dir / "cancel.request"
    if request.exists() and mode != "stubborn":
        request.unlink()
        emit("finished", step=step, cancelled=True, checkpoints=saved)
        sys.exit(0)
emit("finished", step=total, cancelled=False, checkpoints=saved)
'''


def write_fake_engine(folder: Path) -> list[str]:
    """Write the scripted child into ``folder``; returns the launcher to give the Supervisor."""
    script = folder / "fake_engine.py"
    repository = repr(str(Path(__file__).resolve().parents[1]))
    script.write_text(FAKE_ENGINE.replace("REPOSITORY", repository, 1), encoding="utf-8")
    return [sys.executable, str(script)]


class RecordingHost:
    """A Host that keeps a log of every call; its checkpoints are the files under ``models/Stable-diffusion``."""

    checkpoint_refresh_element = "refresh_sd_model_checkpoint"

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir
        self.calls: list[tuple] = []
        self.interrupted = False
        self.titles: dict[str, Path] = {}
        self.lock = threading.Lock()
        self.refresh_checkpoints()
        self.calls.clear()

    def _log(self, *call: object) -> None:
        with self.lock:
            self.calls.append(call)

    def names(self) -> list[str]:
        """The names of the calls in order."""
        with self.lock:
            return [c[0] for c in self.calls]

    def checkpoint_titles(self) -> list[str]:
        return list(self.titles)

    def checkpoint_file(self, title: str) -> Path:
        return self.titles[title]

    def refresh_checkpoints(self) -> None:
        self._log("refresh_checkpoints")
        root = self.models_dir / "Stable-diffusion"
        files = sorted(root.rglob("*.safetensors")) if root.is_dir() else []
        self.titles = {str(p.relative_to(root)).replace("\\", "/"): p for p in files}

    def refresh_loras(self) -> None:
        self._log("refresh_loras")

    def unload_model(self) -> None:
        self._log("unload_model")

    def reload_model(self) -> None:
        self._log("reload_model")

    def job_started(self, title: str, total_steps: int) -> None:
        self._log("job_started", title, total_steps)

    def job_progress(self, step: int, total: int, text: str) -> None:
        self._log("job_progress", step, total, text)

    def job_finished(self) -> None:
        self._log("job_finished")

    def interrupt_requested(self) -> bool:
        return self.interrupted

    def select_checkpoint(self, path: Path) -> str:
        self.refresh_checkpoints()
        title = next(t for t, p in self.titles.items() if p == path)
        self._log("select_checkpoint", title)
        return title
