"""What the demo is doing, while it does it: a bar per phase with an ETA on a terminal, JSON lines otherwise.

The demo (``run.run_demo``) reports its phases -- class images, the three trainings, sampling, judging -- as
events like the engine's, each tagged with ``demo_phase``; the engine's own events during a training are passed on
with the same tag. :class:`DemoProgress` draws them.
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any

from ..events import format_seconds

PHASE = "demo_phase"
"""The key that names the demo's phase in every event it reports."""


class DemoProgress:
    """Draw the demo's events: on a terminal one bar per phase (done/total, ETA), else one JSON object a line."""

    def __init__(self, stream: IO[str] = sys.stdout, json_lines: bool | None = None, width: int = 28) -> None:
        """``json_lines`` None: JSON when ``stream`` is not a terminal."""
        self.stream = stream
        self.json_lines = (not stream.isatty()) if json_lines is None else json_lines
        self.width = width
        self._phase = ""
        self._started = time.monotonic()
        self._bar_shown = False

    def __call__(self, event: dict[str, Any]) -> None:
        """Show one event."""
        if self.json_lines:
            self.stream.write(json.dumps(event, default=str) + "\n")
            self.stream.flush()
            return
        kind = event["event"]
        if kind == "phase":
            self._line(f"== {event[PHASE]}")
            self._phase, self._started = event[PHASE], time.monotonic()
        elif kind == "step":
            self._bar(event["step"], event["total"], event.get("eta_s"), f"loss {event['loss']:.4f}")
        elif kind == "progress":
            self._bar(event["done"], event["total"], None, event.get("phase", ""))
        elif kind in ("warning", "error"):
            self._line(f"{kind}: {event.get('message', '')} {event.get('advice', '')}".rstrip())
        elif kind == "demo_finished":
            self._line(f"done in {event['seconds']:.0f} s ({format_seconds(event['seconds'])})")

    def _bar(self, done: int, total: int, eta: float | None, detail: str) -> None:
        if eta is None:  # from the phase's own pace so far
            elapsed = time.monotonic() - self._started
            eta = elapsed / done * (total - done) if done else None
        filled = int(self.width * done / max(total, 1))
        bar = "#" * filled + "-" * (self.width - filled)
        left = f"ETA {format_seconds(eta)}" if eta is not None else "ETA ?"
        self.stream.write(f"\r[{bar}] {done}/{total} {left} {detail}   ")
        self.stream.flush()
        self._bar_shown = True

    def _line(self, text: str) -> None:
        if self._bar_shown:
            self.stream.write("\n")
            self._bar_shown = False
        self.stream.write(text + "\n")
        self.stream.flush()
