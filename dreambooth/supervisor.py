"""Run one training at a time in a child process and mirror its events into a status a front end can poll.

The child is ``python -m dreambooth train <model dir>/config.json --json``: it prints one JSON event a line
(``events.py`` lists the kinds), exits 0 when finished or cancelled and 1 on an error (an ``error`` event first).
A crash, an out-of-memory or a leaked CUDA context in it never takes the web UI down, and all of its memory is
returned when it ends. Before it starts the host's model leaves the accelerator; after it ends it comes back.

Cancelling never kills first: the supervisor writes ``<model dir>/cancel.request``, the engine stops after the
current step keeping everything saved so far, and only a child that has not exited within ``cancel_timeout``
seconds is terminated.
"""

from __future__ import annotations

import atexit
import collections
import copy
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from .config import (
    TrainConfig,
    check_model_name,
    load_config,
    save_config,
    validate_for_training,
)
from .errors import ConfigError, DreamBoothError
from .events import CANCEL_FILE
from .host.base import Host

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_NAME = "config.json"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
HISTORY_LIMIT = 2000
SAMPLES_KEPT = 16
OUTPUT_LINES_KEPT = 40


@dataclass
class RunStatus:
    """What a front end shows about the current (or last) run; a copy, safe to keep."""

    running: bool = False
    model: str = ""
    step: int = 0
    total: int = 0
    loss: float | None = None
    lr: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None
    memory_mb: float | None = None
    last_checkpoint: str | None = None
    message: str = ""
    error: str | None = None
    cancelled: bool = False
    finished: bool = False
    history: list[dict] = field(default_factory=list)
    """``{"step", "loss", "lr"}`` points for the plot, thinned evenly when a run has very many steps."""
    samples: list[str] = field(default_factory=list)
    """Paths of the newest preview images, oldest first."""
    checkpoints: list[str] = field(default_factory=list)
    """Checkpoints this run has saved, oldest first."""
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The status as JSON-ready data."""
        return asdict(self)


class Busy(DreamBoothError):
    """A training already runs; only one runs at a time."""

    def __init__(self, running_model: str) -> None:
        super().__init__(f"Model {running_model!r} is training now.",
                         "Wait until it finishes, or cancel it first.")
        self.running_model = running_model


def starting_settings(config: TrainConfig) -> TrainConfig:
    """A new model's settings, from its source: its native resolution (what its header declares, 64 for the demo
    model, else its family's: 512, 768 for SD 2.x v-prediction, 1024 for SDXL), and for the shipped demo model the
    demo's training settings (learning rates, steps, text-encoder training, prior loss weight): the defaults are
    SD 1.5's, under which the tiny model learns nothing in a run."""
    from .demo.settings import DEMO_MODEL_TITLE, settings, training_values
    from .models.load import header_metadata, native_resolution

    metadata = header_metadata(Path(config.source_checkpoint))
    values: dict[str, Any] = {}
    if (resolution := native_resolution(Path(config.source_checkpoint))) and resolution != config.resolution:
        values["resolution"] = resolution
    if metadata.get("modelspec.title") == DEMO_MODEL_TITLE:
        values.update(training_values(settings(quick=False)))
    if not values:
        return config
    try:
        return TrainConfig.from_dict({**config.to_dict(), **values})
    except ConfigError:  # a declared value our config does not allow: keep the defaults
        return config


class Supervisor:
    """Owns the model folders, starts and watches the training child, and keeps its :class:`RunStatus`."""

    def __init__(self, host: Host, dreambooth_dir: Path, checkpoints_dir: Path, python: str = sys.executable,
                 *, launcher: Sequence[str] | None = None, cancel_timeout: float = 60.0,
                 poll_interval: float = 0.25, loras_dir: Path | None = None) -> None:
        """``loras_dir`` (default ``<checkpoints_dir>/../Lora``) is where LoRA runs write; ``launcher`` replaces
        ``[python, "-m", "dreambooth"]`` (e.g. ``accelerate launch -m dreambooth``);
        ``train <config> --json`` is appended to it."""
        self.host = host
        self.dreambooth_dir = Path(dreambooth_dir)
        self.checkpoints_dir = Path(checkpoints_dir)
        self.loras_dir = Path(loras_dir) if loras_dir is not None else self.checkpoints_dir.parent / "Lora"
        self.python = python
        self.launcher = list(launcher) if launcher is not None else [python, "-m", "dreambooth"]
        self.cancel_timeout = cancel_timeout
        self.poll_interval = poll_interval
        self._lock = threading.RLock()
        self._status = RunStatus()
        self._busy_model: str | None = None
        self._process: subprocess.Popen[str] | None = None
        self._model_dir: Path | None = None
        self._cancel_deadline: float | None = None
        self._terminated = False
        self._done = threading.Event()
        self._done.set()
        self._output_tail: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES_KEPT)
        self._saved_count = 0
        atexit.register(self.shutdown)

    # ---- model folders -------------------------------------------------------------------------------------

    def model_dir(self, name: str) -> Path:
        """``<dreambooth_dir>/<name>``, after checking that the name cannot reach outside it."""
        return self.dreambooth_dir / check_model_name(name)

    def list_models(self) -> list[str]:
        """Names of the model folders that hold a ``config.json``, sorted case-insensitively."""
        if not self.dreambooth_dir.is_dir():
            return []
        return sorted((p.name for p in self.dreambooth_dir.iterdir() if (p / CONFIG_NAME).is_file()), key=str.lower)

    def create_model(self, name: str, source_checkpoint: str) -> TrainConfig:
        """Make a new model folder whose config starts from ``source_checkpoint`` (a host title or a file path)."""
        folder = self.model_dir(name)
        if folder.exists():
            raise ConfigError(f"A model named {name!r} already exists.", "Open it, or pick another name.")
        source = self._resolve_source(source_checkpoint)
        config = starting_settings(TrainConfig(model_name=name, source_checkpoint=source,
                                               output_dir=str(self.checkpoints_dir / name)))
        self.save_config(config)
        return config

    def load_config(self, name: str) -> TrainConfig:
        """Read ``<name>/config.json``."""
        folder = self.model_dir(name)
        if not (folder / CONFIG_NAME).is_file():
            raise ConfigError(f"There is no model named {name!r}.", "Create it first.")
        return load_config(folder / CONFIG_NAME)

    def save_config(self, config: TrainConfig) -> None:
        """Write the config to its model's folder (atomically), creating the folder when needed."""
        folder = self.model_dir(config.model_name)
        folder.mkdir(parents=True, exist_ok=True)
        save_config(config, folder / CONFIG_NAME)

    def list_checkpoints(self, name: str) -> list[Path]:
        """The model's finished checkpoint files, oldest first (never a half-written ``*.partial``)."""
        folder = self.model_dir(name)
        output = self.checkpoints_dir / name
        if (folder / CONFIG_NAME).is_file():
            try:
                output = Path(self.load_config(name).output_dir or output)
            except ConfigError:
                pass
        if not output.is_dir():
            return []
        files = [p for p in output.iterdir() if p.is_file() and p.suffix.lower() in CHECKPOINT_SUFFIXES]
        return sorted(files, key=lambda p: (p.stat().st_mtime, p.name))

    def _claim_output_dir(self, config: TrainConfig) -> str | None:
        """Make ``config.output_dir`` this model's own: empty, or another model's checkpoint folder (a config copied
        from another model, or trained under a name never created), becomes ``<checkpoints>/<name>``. A folder the
        user set for this model and no other is kept. Returns a warning when a copied folder was replaced."""
        name = check_model_name(config.model_name)
        own, other_kind = self.checkpoints_dir / name, self.loras_dir / name
        if config.method == "lora":  # a LoRA never lands where the checkpoint dropdown lists it, nor the reverse
            own, other_kind = other_kind, own
        if not config.output_dir or _same_path_key(Path(config.output_dir)) == _same_path_key(other_kind):
            config.output_dir = str(own)
            return None
        owner = self._output_owner(Path(config.output_dir), config.model_name)
        if owner is None:
            return None
        copied, config.output_dir = config.output_dir, str(own)
        return (f"output_dir {copied} is the checkpoint folder of model {owner!r}; "
                f"{config.model_name!r} saves its checkpoints to {own} instead.")

    def _output_owner(self, folder: Path, name: str) -> str | None:
        """The other model whose files ``folder`` would land among: its default checkpoint or LoRA folder
        (``<checkpoints>/<other>``, ``<Lora>/<other>``), its model folder, or the output_dir its config.json names
        (or a folder inside its default or model folder); None when the folder belongs to no other model."""
        target = _same_path_key(folder)
        for other in self.list_models():
            if os.path.normcase(other) == os.path.normcase(name):
                continue
            places = (self.checkpoints_dir / other, self.loras_dir / other, self.model_dir(other))
            if any(_inside(target, _same_path_key(place)) for place in places):
                return other
            try:
                configured = load_config(self.model_dir(other) / CONFIG_NAME).output_dir
            except (ConfigError, OSError):
                configured = ""
            if configured and _same_path_key(Path(configured)) == target:
                return other
        return None

    def _resolve_source(self, source: str) -> str:
        if not source:
            raise ConfigError("No source checkpoint was given.", "Pick one of the web UI's checkpoints.")
        if source in self.host.checkpoint_titles() or not Path(source).is_absolute():
            try:  # every name the host's own lookup accepts: a title with or without hash, a file name, a hash …
                return str(self.host.checkpoint_file(source))
            except KeyError:
                pass
        if Path(source).exists():
            return str(Path(source).resolve())
        raise ConfigError(f"Source checkpoint {source!r} is neither a listed checkpoint nor an existing file.",
                          "Refresh the list and pick one of the web UI's checkpoints.")

    # ---- one run ---------------------------------------------------------------------------------------------

    def start(self, config: TrainConfig) -> None:
        """Save the config, free the host's model and start the training child; ``Busy`` if one runs."""
        with self._lock:
            if self._busy_model is not None:
                raise Busy(self._busy_model)
            warnings = validate_for_training(config)
            moved = self._claim_output_dir(config)
            if moved:
                warnings.append(moved)
            self._busy_model = config.model_name
            self._done.clear()
        try:
            self.save_config(config)
            folder = self.model_dir(config.model_name)
            (folder / CANCEL_FILE).unlink(missing_ok=True)
            self._model_dir = folder
            self._output_tail.clear()
            self._terminated = False
            self._cancel_deadline = None
            with self._lock:
                self._status = RunStatus(running=True, model=config.model_name, total=config.max_steps,
                                         message="Starting", warnings=list(warnings))
            self.host.unload_model()
            try:
                self._process = self._spawn(folder / CONFIG_NAME)
            except BaseException:
                self.host.reload_model()
                raise
        except BaseException as exc:
            with self._lock:
                self._busy_model = None
                self._status.running = False
                self._status.error = str(exc)
            self._done.set()
            raise
        self._host_call("show the job", self.host.job_started, f"DreamBooth: {config.model_name}", config.max_steps)
        threading.Thread(target=self._read_events, name="dreambooth-events", daemon=True).start()
        threading.Thread(target=self._watch, name="dreambooth-watch", daemon=True).start()

    def status(self) -> RunStatus:
        """A copy of the current (or last) run's status."""
        with self._lock:
            return copy.deepcopy(self._status)

    def saved_count(self) -> int:
        """How many checkpoints runs of this supervisor have saved so far; it grows right after the host has
        re-listed each new file, so a page that sees it grow can re-list its dropdown and find the file."""
        with self._lock:
            return self._saved_count

    def running_model(self) -> str | None:
        """The name of the model that trains now, or None."""
        with self._lock:
            return self._busy_model

    def cancel(self) -> None:
        """Ask the run to stop after its current step; it is terminated if it has not exited in time."""
        with self._lock:
            if self._busy_model is None or self._model_dir is None:
                return
            if self._cancel_deadline is None:
                self._cancel_deadline = time.monotonic() + self.cancel_timeout
                self._status.message = "Stopping after the current step"
            folder = self._model_dir
        try:
            (folder / CANCEL_FILE).touch()
        except OSError as exc:
            with self._lock:
                self._status.warnings.append(f"Could not write the cancel request ({exc}); stopping the process.")
            self._terminate()

    def shutdown(self, timeout: float = 30.0) -> None:
        """When the web UI exits: ask a running child to stop (it keeps what it saved) and wait a little for it.

        The child's stdin is a pipe that nothing writes to; it reaches end-of-file when this process is gone,
        however it ended, so an engine that watches its stdin can stop by itself too."""
        if self.running_model() is not None:
            self.cancel()
            if not self.wait(timeout):
                self._terminate()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run (and its clean-up) has ended; False on timeout."""
        return self._done.wait(timeout)

    def _spawn(self, config_path: Path) -> subprocess.Popen[str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"
        log_dir = config_path.parent / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / "child-stderr.log", "w", encoding="utf-8") as stderr:
            command = [*self.launcher, "train", str(config_path), "--json", "--cancel-on-stdin-eof"]
            return subprocess.Popen(command, cwd=str(REPO_ROOT), env=env,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                    text=True, encoding="utf-8", errors="replace", bufsize=1)

    def _read_events(self) -> None:
        process = self._process
        assert process is not None and process.stdout is not None
        try:
            self._consume(process.stdout)
            code = process.wait()
            self._finish(code)
        finally:
            self._clean_up()

    def _consume(self, stream: IO[str]) -> None:
        for line in stream:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = None
            if not isinstance(event, dict) or "event" not in event:
                self._output_tail.append(line)
                continue
            try:
                self._apply(event)
            except Exception as exc:  # a malformed event must not stop the reading: the child would block
                self._output_tail.append(f"unreadable event {line!r}: {exc}")

    def _apply(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        with self._lock:
            s = self._status
            if kind == "started":
                s.total = int(event.get("total_steps", s.total))
                s.step = int(event.get("resumed_from", 0) or 0)
                s.message = "Training"
            elif kind == "status":
                s.message = str(event.get("message", ""))
            elif kind == "progress":
                s.message = f"{event.get('phase', '')}: {event.get('done', 0)}/{event.get('total', 0)}"
            elif kind == "step":
                s.step, s.total = int(event["step"]), int(event.get("total", s.total))
                for name in ("loss", "lr", "it_per_s", "eta_s", "memory_mb"):
                    value = event.get(name)
                    setattr(s, name, float(value) if value is not None else None)
                s.message = "Training"
                s.history.append({"step": s.step, "loss": s.loss, "lr": s.lr})
                if len(s.history) > HISTORY_LIMIT:
                    s.history = s.history[::2]
            elif kind == "checkpoint_saved":
                s.last_checkpoint = str(event["path"])
                s.checkpoints.append(s.last_checkpoint)
                s.message = f"Saved {Path(s.last_checkpoint).name}"
            elif kind == "state_saved":
                s.message = f"Resume point saved at step {event.get('step')}"
            elif kind == "sample":
                s.samples = (s.samples + [str(p) for p in event.get("paths", [])])[-SAMPLES_KEPT:]
            elif kind == "warning":
                message = str(event.get("message", ""))
                if message not in s.warnings:  # the start's own checks and the engine's report the same warnings
                    s.warnings.append(message)
            elif kind == "error":
                s.error = f"{event.get('message', '')} {event.get('advice', '')}".strip()
                s.message = "Failed"
            elif kind == "finished":
                s.finished = True
                s.cancelled = bool(event.get("cancelled", False))
                s.step = int(event.get("step", s.step))
                s.checkpoints = [str(p) for p in event.get("checkpoints", s.checkpoints)] or s.checkpoints
                s.message = "Cancelled" if s.cancelled else "Finished"
            step, total, text = s.step, s.total, s.message
        if kind == "checkpoint_saved" and event.get("kind") == "lora":
            self._host_call("refresh the LoRA list", self.host.refresh_loras)
        elif kind == "checkpoint_saved":
            self._host_call("refresh the checkpoint list", self.host.refresh_checkpoints)
        if kind == "checkpoint_saved":
            with self._lock:
                self._saved_count += 1
        if kind in ("started", "step", "progress"):
            detail = text if kind != "step" else f"step {step}/{total}"
            self._host_call("show progress", self.host.job_progress, step, total, detail)

    def _watch(self) -> None:
        process = self._process
        assert process is not None
        while process.poll() is None:
            if self._cancel_deadline is None:
                interrupted = self._host_call("read the Interrupt button", self.host.interrupt_requested)
                if interrupted:
                    self.cancel()
            elif time.monotonic() > self._cancel_deadline:
                self._terminate()
                return
            time.sleep(self.poll_interval)

    def _terminate(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            self._terminated = True
            process.terminate()

    def _finish(self, code: int) -> None:
        with self._lock:
            s = self._status
            if code == 0 and not s.finished:
                s.finished = True
                s.message = "Finished"
            if self._terminated:
                s.cancelled = True
                s.message = "Stopped (the run did not stop by itself and was terminated)"
            elif code != 0 and s.error is None:
                tail = "\n".join(self._output_tail)
                stderr_tail = self._stderr_tail()
                s.error = (f"The training process exited with code {code}. "
                           f"{stderr_tail or tail}").strip()
                s.message = "Failed"

    def _stderr_tail(self) -> str:
        if self._model_dir is None:
            return ""
        try:
            lines = (self._model_dir / "logs" / "child-stderr.log").read_text(encoding="utf-8",
                                                                              errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-15:])

    def _clean_up(self) -> None:
        try:
            if self._model_dir is not None:
                (self._model_dir / CANCEL_FILE).unlink(missing_ok=True)
            self._host_call("clear the progress", self.host.job_finished)
            self._host_call("refresh the checkpoint list", self.host.refresh_checkpoints)
            self._host_call("reload the web UI's model", self.host.reload_model)
        finally:
            process = self._process
            if process is not None and process.stdin is not None:
                process.stdin.close()
            with self._lock:
                self._status.running = False
                self._busy_model = None
                self._process = None
            self._done.set()

    def _host_call(self, what: str, function: Any, *args: Any) -> Any:
        """Call the host; a failure there becomes a warning instead of stopping the supervision."""
        try:
            return function(*args)
        except Exception as exc:  # a failure of the host must not leave the run unsupervised
            with self._lock:
                self._status.warnings.append(f"Could not {what}: {exc}")
            return None


def _same_path_key(path: Path) -> str:
    """``path`` made absolute and normalised (case-folded on Windows), for comparing folders that need not exist."""
    return os.path.normcase(os.path.abspath(path))


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (both from :func:`_same_path_key`)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)
