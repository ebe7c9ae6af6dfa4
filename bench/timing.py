"""What every runner records, the same way: wall-clock points synchronised with the GPU, and peak memory.

``StepClock.at_step(i)`` is called at the start of step ``i`` (0-based, before its forward pass): step 1 marks
the end of the first step (time to first step), steps ``warmup`` and ``warmup + timed`` bound the timed window.
Only those three calls synchronise; the others cost a counter increment. ``peak_bytes`` is the whole process's
peak ``torch.cuda.max_memory_allocated``; ``peak_before_steps_bytes`` the part before step 0 (loading, caching,
recording, compiling) and ``peak_steps_bytes`` the steps' own (the peak statistics are reset at step 0). Times
are ``time.time()`` so the orchestrator can subtract its own launch time. With ``exit_when_timed`` the clock
writes its file and ends the process at the start of step ``warmup + timed`` (``os._exit``: no final save, no
orderly shutdown of loader workers), so a benchmark spends no time on what it does not measure.

``phase(name)`` (optional) splits the time before step 0 further: each phase's peak is recorded as
``peak_phase_<name>_bytes`` (allocated) and ``reserved_phase_<name>_bytes`` (the caching allocator's reserve, which
also holds a CUDA graph's private pool: a recorded step replays into memory that ``max_memory_allocated`` no longer
counts once the recording is over). ``peak_reserved_bytes`` is the whole process's reserve at its peak.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch


def timed(fn, repeat: int) -> float:
    """Median milliseconds of ``fn`` over ``repeat`` runs (each synchronised)."""
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


class StepClock:
    """Records the marks described in the module docstring and writes them as JSON."""

    def __init__(self, path: Path, warmup: int, timed: int, exit_when_timed: bool = False, **extra) -> None:
        self.path, self.warmup, self.timed = Path(path), warmup, timed
        self.exit_when_timed = exit_when_timed
        self.extra = extra
        self.marks: dict[str, float] = {}
        self.index = 0
        self.current_phase = "start"
        self.before_allocated = self.before_reserved = 0.0

    def _mark(self, name: str) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.marks[name] = time.time()

    def at_step(self) -> None:
        """Call at the start of every training step."""
        i = self.index
        self.index += 1
        if i == 0 and torch.cuda.is_available():  # what loading and caching took, then the steps' own peak
            self._close_phase()
            self.marks["peak_before_steps_bytes"] = self.before_allocated
            self.marks["peak_reserved_before_steps_bytes"] = self.before_reserved
        if i == 1:
            self._mark("first_step_done")
            self.write()  # kept if the process dies or runs out of time later
        if i == self.warmup:
            self._mark("timed_start")
        if i == self.warmup + self.timed:
            self._mark("timed_end")
            if torch.cuda.is_available():
                self.marks["peak_steps_bytes"] = float(torch.cuda.max_memory_allocated())
                self.marks["peak_bytes"] = max(self.marks["peak_steps_bytes"],
                                               self.marks.get("peak_before_steps_bytes", 0.0))
                self.marks["peak_reserved_bytes"] = max(float(torch.cuda.max_memory_reserved()),
                                                        self.marks.get("peak_reserved_before_steps_bytes", 0.0))
            if self.exit_when_timed:
                self.write(exited_after_timed=True)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)

    def phase(self, name: str) -> None:
        """Call where a phase before step 0 starts (loading, caching, recording …): the phase before it ends."""
        if self.index or not torch.cuda.is_available():
            return
        self._close_phase()
        self.current_phase = name

    def _close_phase(self) -> None:
        """Record the current phase's peaks (the larger one if the phase ran before) and restart the statistics."""
        allocated, reserved = float(torch.cuda.max_memory_allocated()), float(torch.cuda.max_memory_reserved())
        for key, value in ((f"peak_phase_{self.current_phase}_bytes", allocated),
                           (f"reserved_phase_{self.current_phase}_bytes", reserved)):
            self.marks[key] = max(value, self.marks.get(key, 0.0))
        self.before_allocated = max(self.before_allocated, allocated)
        self.before_reserved = max(self.before_reserved, reserved)
        torch.cuda.reset_peak_memory_stats()

    def mark(self, name: str, value: float | None = None) -> None:
        """Record another point (synchronised) or a value."""
        if value is None:
            self._mark(name)
        else:
            self.marks[name] = value

    def write(self, **extra) -> None:
        """Write the marks (and ``extra``) to the JSON file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({**self.marks, **self.extra, **extra, "steps_seen": self.index}, indent=1))
