"""Progress events: one JSON object a line, on stdout (for a supervisor) and in ``logs/events.jsonl``.

Every event has ``event`` (its kind) and ``time`` (Unix seconds). The kinds and their fields:

- ``started``: ``model``, ``total_steps``, ``resumed_from`` (step or 0), and how the step runs: ``device``,
  ``weights``, ``precision``, ``optimizer``, ``attention``, ``gradient_checkpointing``, ``channels_last``,
  ``cuda_graphs`` ("step": the whole step recorded, "denoiser": the UNet's forward and backward, or null),
  ``compiled_blocks`` (UNet blocks compiled by torch.compile, 0 when not) and ``compile_s`` (seconds compiling)
- ``status``: ``message`` (a phase: loading the model, generating class images, caching)
- ``progress``: ``phase``, ``done``, ``total`` (class-image generation, caching)
- ``step``: ``step``, ``total``, ``loss``, ``lr``, ``it_per_s``, ``eta_s``, ``memory_mb``
- ``checkpoint_saved``: ``path``, ``step``
- ``state_saved``: ``path``, ``step``
- ``sample``: ``paths``, ``step``
- ``warning``: ``message``
- ``error``: ``kind``, ``message``, ``advice``
- ``finished``: ``step``, ``cancelled``, ``checkpoints``
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

CANCEL_FILE = "cancel.request"
"""The other direction of the protocol: a file of this name in the model folder asks the run to stop after the
current step (the supervisor, the tab's Cancel and the web UI's Interrupt all create it)."""


class Events:
    """Where the engine reports what happens; front ends read the same lines back."""

    def __init__(
        self,
        log_path: Path | None = None,
        stream: IO[str] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.log_path = log_path
        self.stream = stream
        self.on_event = on_event
        self._log: IO[str] | None = None

    def emit(self, kind: str, /, **fields: Any) -> dict[str, Any]:
        """Record one event and hand it to every listener."""
        event = {"event": kind, "time": round(time.time(), 3), **fields}
        line = json.dumps(event, default=str)
        if self.log_path is not None:
            if self._log is None:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                self._log = open(self.log_path, "a", encoding="utf-8")
            self._log.write(line + "\n")
            self._log.flush()
        if self.stream is not None:
            self.stream.write(line + "\n")
            self.stream.flush()
        if self.on_event is not None:
            self.on_event(event)
        return event

    def close(self) -> None:
        """Close the log file."""
        if self._log is not None:
            self._log.close()
            self._log = None


class TerminalProgress:
    """A one-line progress bar on a terminal: step/total, loss, it/s, ETA; other events as lines."""

    def __init__(self, stream: IO[str] = sys.stderr, width: int = 28) -> None:
        self.stream = stream
        self.width = width
        self._bar_shown = False

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "step":
            done = int(self.width * event["step"] / max(event["total"], 1))
            bar = "#" * done + "-" * (self.width - done)
            self.stream.write(
                f"\r[{bar}] {event['step']}/{event['total']} loss {event['loss']:.4f} "
                f"{event['it_per_s']:.2f} it/s ETA {format_seconds(event['eta_s'])}   "
            )
            self._bar_shown = True
        elif kind == "progress":
            self.stream.write(f"\r{event['phase']}: {event['done']}/{event['total']}   ")
            self._bar_shown = True
        else:
            text = {
                "status": lambda e: e["message"],
                "warning": lambda e: f"warning: {e['message']}",
                "error": lambda e: f"error: {e['message']} {e.get('advice', '')}".strip(),
                "checkpoint_saved": lambda e: f"saved {e['path']}",
                "state_saved": lambda e: f"resume point {e['path']}",
                "sample": lambda e: f"samples: {', '.join(e['paths'])}",
                "started": lambda e: (
                    f"training {e['model']}: {e['total_steps']} steps"
                    + (f", resuming at {e['resumed_from']}" if e["resumed_from"] else "")
                ),
                "finished": lambda e: ("cancelled" if e["cancelled"] else "finished") + f" at step {e['step']}",
            }.get(kind)
            if text is None:
                return
            if self._bar_shown:
                self.stream.write("\n")
                self._bar_shown = False
            self.stream.write(text(event) + "\n")
        self.stream.flush()


def format_seconds(seconds: float) -> str:
    """``3725`` → ``'1:02:05'``."""
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
