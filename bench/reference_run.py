"""Run diffusers' train_dreambooth.py unchanged, with a :class:`StepClock` around its UNet calls.

Usage: python bench/reference_run.py TIMING.json WARMUP TIMED SCRIPT [--bench-persistent-workers] [script args...]

The script calls the UNet exactly once per training step (no validation prompt is given), so a wrapper on
``UNet2DConditionModel.forward`` marks step starts. The final ``DiffusionPipeline.from_pretrained`` +
``save_pretrained`` is its save; both are wrapped to time it. ``--bench-persistent-workers`` (ours, taken out
before the script sees its arguments) makes its DataLoader keep its worker processes between epochs, which the
script has no flag for.
"""

from __future__ import annotations

import os
import runpy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import StepClock

PERSISTENT_FLAG = "--bench-persistent-workers"


def keep_loader_workers() -> None:
    """Give every DataLoader with worker processes ``persistent_workers=True`` unless it says otherwise."""
    import torch.utils.data

    loader_init = torch.utils.data.DataLoader.__init__

    def init(self, *a, **k):
        if k.get("num_workers", 0) > 0:
            k.setdefault("persistent_workers", True)
        loader_init(self, *a, **k)

    torch.utils.data.DataLoader.__init__ = init


def main() -> None:
    """Patch, then execute the reference script as ``__main__``."""
    timing_path, warmup, timed, script, *args = sys.argv[1:]
    clock = StepClock(Path(timing_path), int(warmup), int(timed), runner="reference",
                      exit_when_timed=os.environ.get("BENCH_EXIT_WHEN_TIMED") == "1")
    clock.mark("process_start", time.time())

    import diffusers

    unet_forward = diffusers.UNet2DConditionModel.forward

    def timed_forward(self, *a, **k):
        clock.at_step()
        return unet_forward(self, *a, **k)

    diffusers.UNet2DConditionModel.forward = timed_forward

    pipeline_load = diffusers.DiffusionPipeline.from_pretrained.__func__

    def timed_load(cls, *a, **k):
        clock.mark("save_start")
        return pipeline_load(cls, *a, **k)

    diffusers.DiffusionPipeline.from_pretrained = classmethod(timed_load)

    pipeline_save = diffusers.DiffusionPipeline.save_pretrained

    def timed_save(self, *a, **k):
        result = pipeline_save(self, *a, **k)
        clock.mark("save_end")
        return result

    diffusers.DiffusionPipeline.save_pretrained = timed_save

    if PERSISTENT_FLAG in args:
        args = [a for a in args if a != PERSISTENT_FLAG]
        keep_loader_workers()
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        clock.write()


if __name__ == "__main__":
    main()
