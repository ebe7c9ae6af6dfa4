"""Run one of kohya-ss/sd-scripts' training scripts unchanged, with a :class:`StepClock` on its UNet.

Usage: python bench/kohya_run.py TIMING.json WARMUP TIMED SCRIPT [script args...]

SCRIPT is ``sdxl_train.py`` or ``sdxl_train_network.py`` of a copy of sd-scripts (fetched, never committed: the
bench copies it under ``build/``). Both call their UNet, kohya's own ``SdxlUNet2DConditionModel``, exactly once a
training step (no sample prompts are given), so a wrapper on that class's ``forward`` marks step starts; with
``BENCH_EXIT_WHEN_TIMED=1`` the process ends at the end of the timed window (no final save). This file imports
nothing but torch and the clock before the script runs: kohya's scripts run on the transformers and diffusers
they pin (``bench/peers.sh`` puts those first on ``PYTHONPATH`` for these runs only).
"""

from __future__ import annotations

import os
import runpy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import StepClock


def main() -> None:
    """Patch the clock into kohya's UNet class, then execute the script as ``__main__``."""
    timing_path, warmup, timed, script, *args = sys.argv[1:]
    clock = StepClock(Path(timing_path), int(warmup), int(timed), runner="kohya",
                      exit_when_timed=os.environ.get("BENCH_EXIT_WHEN_TIMED") == "1")
    clock.mark("process_start", time.time())
    script_dir = str(Path(script).resolve().parent)
    sys.path.insert(0, script_dir)  # its `library` and `networks` packages
    os.chdir(script_dir)

    from library import sdxl_original_unet

    unet_forward = sdxl_original_unet.SdxlUNet2DConditionModel.forward

    def timed_forward(self, *a, **k):
        clock.at_step()
        return unet_forward(self, *a, **k)

    sdxl_original_unet.SdxlUNet2DConditionModel.forward = timed_forward
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        clock.write()


if __name__ == "__main__":
    main()
