"""Run diffusers' train_dreambooth.py unchanged, with a :class:`StepClock` around its UNet calls.

Usage: python bench/reference_run.py TIMING.json WARMUP TIMED SCRIPT [script args...]

The script calls the UNet exactly once per training step (no validation prompt is given), so a wrapper on
``UNet2DConditionModel.forward`` marks step starts. The final ``DiffusionPipeline.from_pretrained`` +
``save_pretrained`` is its save; both are wrapped to time it.
"""

from __future__ import annotations

import runpy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import StepClock


def main() -> None:
    """Patch, then execute the reference script as ``__main__``."""
    timing_path, warmup, timed, script, *args = sys.argv[1:]
    clock = StepClock(Path(timing_path), int(warmup), int(timed))
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

    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        clock.write(runner="reference")


if __name__ == "__main__":
    main()
