"""Run our engine (``python -m dreambooth train``) in-process with a :class:`StepClock` on its steps.

Usage (the bench builds the command): python bench/engine_run.py TIMING.json WARMUP TIMED CONFIG.json

The clock wraps ``dreambooth.train.loop.add_noise`` (called once per micro-batch, outside any compiled
region); the save is timed around ``dreambooth.engine._save`` (a LoRA run's around
``dreambooth.models.lora_export.save_lora``). Each mode is a set of TrainConfig values;
values the current TrainConfig does not declare are dropped and listed in the timing file, so the bench runs
against any version of the engine and says what it could not switch on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from timing import StepClock

EXIT_WHEN_TIMED = os.environ.get("BENCH_EXIT_WHEN_TIMED") == "1"
"""Set by a bench that measures no save: the process ends at the end of the timed window (``StepClock``); not
under a launcher, whose other processes would wait for process 0 forever."""
RANK0 = os.environ.get("RANK", "0") == "0"

COMMON = {
    "learning_rate": 5e-6,
    "lr_scheduler": "constant",
    "lr_warmup_steps": 0,
    "prior_preservation": True,
    "prior_loss_weight": 1.0,
    "center_crop": True,
    "hflip": False,
    "cache_latents": True,
    "cache_text_embeddings": True,
    "save_every": 0,
    "state_every": 0,
    "sample_every": 0,
    "save_dtype": "fp16",
    "seed": 0,
    "resolution": 512,
}
SPEED = {
    "mixed_precision": "bf16",
    "weights_dtype": "bf16",
    "cuda_graphs": True,
    "compile_optimizer": True,
    "channels_last": True,
    "log_every": 10,
}
LOW_MEMORY = {
    "mixed_precision": "bf16",
    "weights_dtype": "bf16",
    "optimizer": "adamw_8bit",
    "gradient_checkpointing": True,
    "optimizer_in_backward": True,
    "cuda_graphs": True,
    "compile_optimizer": True,
    "log_every": 10,
}
ENGINE_MODES = {
    "speed-b1": {"batch_size": 1, **SPEED},
    "speed-b8": {"batch_size": 8, **SPEED},
    "speed-b16": {"batch_size": 16, **SPEED},
    "speed-b32": {"batch_size": 32, **SPEED},
    "speed-b1-compiled": {"batch_size": 1, **SPEED, "compile_unet": True},
    "speed-b16-compiled": {"batch_size": 16, **SPEED, "compile_unet": True},
    "speed-b16-nchw": {"batch_size": 16, **SPEED, "channels_last": False},
    "speed-b16-compiled-nchw": {"batch_size": 16, **SPEED, "compile_unet": True, "channels_last": False},
    "speed-b24-compiled": {"batch_size": 24, **SPEED, "compile_unet": True},
    "speed-b32-compiled": {"batch_size": 32, **SPEED, "compile_unet": True},
    "speed-b32-compiled-nchw": {"batch_size": 32, **SPEED, "compile_unet": True, "channels_last": False},
    # data-parallel, one process per GPU (``processes`` is the bench's, not a TrainConfig option); compare with the
    # one-GPU mode of the same name: images/s counts every process's images
    "speed-b16-2gpu": {"batch_size": 16, **SPEED, "processes": 2},
    "speed-b16-compiled-nchw-2gpu": {"batch_size": 16, **SPEED, "compile_unet": True, "channels_last": False,
                                     "processes": 2},
    "lowmem-b1": {"batch_size": 1, **LOW_MEMORY},
    "lowmem-b1-compiled": {"batch_size": 1, **LOW_MEMORY, "compile_unet": True},
    "plain-b1": {"batch_size": 1, "mixed_precision": "bf16"},
}


def write_config(mode: str, a, model: Path, instance: Path, klass: Path, work: Path) -> tuple[Path, list[str]]:
    """The model folder's config.json for ``mode``; returns its path and the options this engine lacks."""
    from dreambooth.config import Concept, TrainConfig

    model_dir = work / f"engine-{mode}"
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    wanted = {
        **COMMON,
        **{k: v for k, v in ENGINE_MODES[mode].items() if k != "processes"},
        "max_steps": a.warmup + a.steps + 1,
        "model_name": f"bench-{mode}",
        "source_checkpoint": str(model),
        "tokenizer_dir": str(Path(a.tokenizer).resolve()),
        "output_dir": str(model_dir / "out"),
    }
    dropped = sorted(k for k in wanted if k not in known)
    config = TrainConfig(**{k: v for k, v in wanted.items() if k in known})
    config.concepts = [
        Concept(
            instance_dir=str(instance),
            instance_prompt="a photo of zwx dog",
            class_prompt="a photo of dog",
            class_dir=str(klass),
            num_class_images=len(list(klass.glob("*.jpg"))),
        )
    ]
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / "config.json"
    path.write_text(json.dumps(config.to_dict(), indent=1))
    return path, dropped


def engine_command(mode: str, a, model: Path, instance: Path, klass: Path, timing: Path, work: Path) -> list[str]:
    """The command line of one engine run (writes its config first)."""
    path, dropped = write_config(mode, a, model, instance, klass, work)
    processes = ENGINE_MODES[mode].get("processes", 1)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    return [
        sys.executable,
        *launcher,
        str(HERE / "engine_run.py"),
        str(timing),
        str(a.warmup),
        str(a.steps),
        str(path),
        ",".join(dropped),
    ]


PHASES = {
    ("dreambooth.engine", "generate_class_images"): "class_images",
    ("dreambooth.data.cache", "ImageLatents.prepare"): "cache_latents",
    ("dreambooth.data.cache", "PromptEmbeddings.__call__"): "cache_embeddings",
    ("dreambooth.train.trained", "FullWeights.place"): "place",
    ("dreambooth.train.trained", "LoraAdapters.place"): "place",
    ("dreambooth.train.loop", "_compile_unet"): "compile",
    ("dreambooth.train.loop", "_capture"): "record_graph",
    ("dreambooth.train.loop", "_capture_step"): "record_graph",
}
"""Functions whose call starts a phase before step 0 (``StepClock.phase``: each phase's own peak); the phase before
the first of them is 'start' (imports, loading). Those this version of the engine lacks are skipped."""
ONCE = {"cache_embeddings"}
"""Phases started by their function's first call only (the step graph's recording asks for embeddings too)."""


def _phases(clock: StepClock) -> None:
    import importlib

    fired: set[str] = set()
    for (module_name, path), phase in PHASES.items():
        owner = importlib.import_module(module_name)
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent, None)
        original = getattr(owner, name, None) if owner is not None else None
        if original is None or (parents and name not in vars(owner)):
            continue

        def started(*args, _original=original, _phase=phase, **kwargs):
            if _phase not in fired:
                clock.phase(_phase)
            if _phase in ONCE:
                fired.add(_phase)
            return _original(*args, **kwargs)

        setattr(owner, name, started)


def main() -> None:
    """Patch the clock in, then run the engine's command line."""
    timing_path, warmup, timed, config_path, *rest = sys.argv[1:]
    ignored = [d for d in (rest[0].split(",") if rest else []) if d]
    clock = StepClock(Path(timing_path), int(warmup), int(timed), runner="engine", ignored_options=ignored,
                      exit_when_timed=EXIT_WHEN_TIMED and "RANK" not in os.environ)
    clock.mark("process_start", time.time())
    from dreambooth import engine
    from dreambooth.train import loop

    add_noise = loop.add_noise

    def timed_add_noise(*args, **kwargs):
        clock.at_step()
        return add_noise(*args, **kwargs)

    loop.add_noise = timed_add_noise
    save = engine._save

    def timed_save(*args, **kwargs):
        clock.mark("save_start")
        result = save(*args, **kwargs)
        clock.mark("save_end")
        return result

    engine._save = timed_save
    from dreambooth.models import lora_export

    save_lora = lora_export.save_lora

    def timed_save_lora(*args, **kwargs):  # method="lora": the engine looks the writer up at run time
        clock.mark("save_start")
        result = save_lora(*args, **kwargs)
        clock.mark("save_end")
        return result

    lora_export.save_lora = timed_save_lora
    _phases(clock)
    from dreambooth.__main__ import main as cli

    try:
        rc = cli(["train", config_path, "--json"])
    finally:
        if RANK0:  # under a launcher, process 0 times the run
            clock.write()
    raise SystemExit(rc)


if __name__ == "__main__":
    main()
