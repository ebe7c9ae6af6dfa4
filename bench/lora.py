"""LoRA on the GPU: a correctness sweep of the engine's switches with ``method="lora"``, and the benchmark against
diffusers' ``examples/dreambooth/train_dreambooth_lora.py`` (SD 1.5, 512 px) and ``train_dreambooth_lora_sdxl.py``
(SDXL, 1024 px), side by side in one invocation, each run in its own process.

    python bench/lora.py --out OUT --sweep                        # every SWEEP mode, 10 + 20 steps, 20 class images
    python bench/lora.py --out OUT --reference-dir build/reference --runs reference:sd15-bf16 engine:sd15-attn ...
    python bench/lora.py --out OUT --tiny --runs engine:sd15-attn  # a CPU smoke run of the plumbing (tiny model)

Models: the exact SD 1.5 architecture (``bench/sd15.py``) and SDXL's (``bench/family_memory.py``) with random weights
from a seed; speed and memory do not depend on the values. Work: the issue's dataset shape (``bench/dataset.py``:
10 instance + 200 class JPEGs), prior preservation (1 instance + 1 class image a step), batch 1, AdamW, constant LR
1e-4, rank 16, alpha 16 (the reference ties alpha to its ``--rank``). ``--warmup`` steps, then ``--steps`` timed
ones. Reported per run: steps/s over the timed window, peak ``torch.cuda.max_memory_allocated`` (whole process, and
the steps' own: ``bench/timing.py``), time to the first step (process launch → end of step 1: imports, loading,
caching, recording, compiling), the LoRA file's size, how many of its up weights moved off zero (peft starts them at
zero: a non-zero one learned), whether every logged loss is finite, and for the engine what it switched on (its
``started`` event).

The reference scripts are fetched, never committed (``git show v0.40.0:examples/dreambooth/<script>``; v0.42.1 is
the installed diffusers, whose release tag the local mirror lacked; the scripts' ``check_min_version`` is 0.40.0).
They run unchanged under a thin wrapper (``--reference-main``): a clock on ``UNet2DConditionModel.forward`` (called
once a step: no validation prompt is given), the save timed around ``save_lora_weights``, and the process ended right
after it (the scripts then reload the whole pipeline to apply the LoRA once, which is no part of training).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(REPO))

INSTANCE_PROMPT, CLASS_PROMPT = "a photo of zwx dog", "a photo of dog"
RANK, LEARNING_RATE = 16, 1e-4
RESOLUTION = {"sd15": 512, "sdxl": 1024}

ENGINE_COMMON = {
    "method": "lora",
    "lora_rank": RANK,
    "lora_alpha": float(RANK),
    "learning_rate": LEARNING_RATE,
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
    "batch_size": 1,
    "log_every": 5,
}
LOWMEM = {"optimizer": "adamw_8bit", "gradient_checkpointing": True, "optimizer_in_backward": True}
FP8 = {"lora_base_precision": "fp8"}
"""Frozen base weights in float8 (the engine's ``train/speed/float8.py``; kohya's ``--fp8_base``)."""
ENGINE_MODES: dict[str, tuple[str, dict]] = {
    # the engine's defaults (weights_dtype/mixed_precision auto: bf16 weights on the flat path, CUDA graphs on)
    "sd15-default": ("sd15", {}),
    "sd15-attn": ("sd15", {"lora_layers": "attention"}),  # the reference scripts' layers
    "sd15-conv": ("sd15", {"lora_layers": "attention_ff_conv"}),
    "sd15-no-graphs": ("sd15", {"cuda_graphs": False}),
    "sd15-in-backward": ("sd15", {"optimizer_in_backward": True}),
    "sd15-compiled": ("sd15", {"compile_unet": True}),
    "sd15-8bit": ("sd15", {"optimizer": "adamw_8bit"}),
    "sd15-fp32": ("sd15", {"weights_dtype": "fp32", "mixed_precision": "bf16"}),
    "sd15-ckpt": ("sd15", {"gradient_checkpointing": True}),
    "sd15-lowmem": ("sd15", LOWMEM),
    "sd15-te": ("sd15", {"train_text_encoder": True, "text_encoder_lr": 5e-5}),
    "sd15-attn-ckpt": ("sd15", {"lora_layers": "attention", "gradient_checkpointing": True}),
    "sd15-attn-lowmem": ("sd15", {"lora_layers": "attention", **LOWMEM}),
    "sd15-attn-compiled": ("sd15", {"lora_layers": "attention", "compile_unet": True}),
    "sd15-attn-fp8": ("sd15", {"lora_layers": "attention", **FP8}),
    "sd15-attn-lowmem-fp8": ("sd15", {"lora_layers": "attention", **LOWMEM, **FP8}),
    "sdxl-default": ("sdxl", {}),
    "sdxl-attn": ("sdxl", {"lora_layers": "attention"}),
    "sdxl-attn-ckpt": ("sdxl", {"lora_layers": "attention", "gradient_checkpointing": True}),
    "sdxl-attn-lowmem": ("sdxl", {"lora_layers": "attention", **LOWMEM}),
    "sdxl-lowmem": ("sdxl", LOWMEM),
    "sdxl-attn-fp8": ("sdxl", {"lora_layers": "attention", **FP8}),
    "sdxl-attn-lowmem-fp8": ("sdxl", {"lora_layers": "attention", **LOWMEM, **FP8}),
    "sdxl-attn-ckpt-fp8": ("sdxl", {"lora_layers": "attention", "gradient_checkpointing": True, **FP8}),
}
MEMORY = ["engine:sd15-attn", "engine:sd15-attn-lowmem", "engine:sd15-attn-fp8", "engine:sd15-attn-lowmem-fp8",
          "engine:sdxl-attn-lowmem", "engine:sdxl-attn-lowmem-fp8", "engine:sdxl-attn-fp8"]
"""``--memory``: issue 16's memory targets (SD 1.5 ≤ 2.5 GB, SDXL ≤ 5 GB at batch 1), with each phase's own peak
(loading, caching latents and embeddings, placing the UNet, recording the graph) and the allocator's reserve."""
SWEEP = ["sd15-default", "sd15-no-graphs", "sd15-in-backward", "sd15-compiled", "sd15-8bit", "sd15-fp32", "sd15-ckpt",
         "sd15-lowmem", "sd15-te", "sd15-attn", "sd15-conv"]

REFERENCE_COMMON = ["--mixed_precision", "bf16", "--train_batch_size", "1", "--rank", str(RANK)]
WORKERS = ["--dataloader_num_workers", "4", "--bench-persistent-workers"]
"""The reference's loader at its best (``bench/run.py``'s REFERENCE_LOADER). Not with
``--pre_compute_text_embeddings``: its dataset then hands out CUDA tensors, which a forked loader worker cannot
touch (``CUDA error: initialization error`` in ``collate_fn``, seen on the H200), so that flag runs with the loader
on the training thread."""
REFERENCE_MODES: dict[str, tuple[str, str, list[str]]] = {
    "sd15-bf16": ("sd15", "train_dreambooth_lora.py", WORKERS),
    "sd15-bf16-precompute": ("sd15", "train_dreambooth_lora.py", ["--pre_compute_text_embeddings"]),
    "sd15-bf16-ckpt": ("sd15", "train_dreambooth_lora.py", [*WORKERS, "--gradient_checkpointing"]),
    "sd15-bf16-precompute-ckpt": ("sd15", "train_dreambooth_lora.py",
                                  ["--pre_compute_text_embeddings", "--gradient_checkpointing"]),
    # SDXL's script encodes the instance and class prompts once by itself when the text encoders are frozen
    "sdxl-bf16": ("sdxl", "train_dreambooth_lora_sdxl.py", WORKERS),
    "sdxl-bf16-ckpt": ("sdxl", "train_dreambooth_lora_sdxl.py", [*WORKERS, "--gradient_checkpointing"]),
}
"""The reference's modes: ``--mixed_precision bf16`` (bf16 weights, fp32 LoRA parameters), ``--rank 16``; no
``--use_8bit_adam`` (bitsandbytes is not on the GPU machine, and 8-bit moments of a few million LoRA weights save
a few MB)."""
PAIRS = [
    ("SD 1.5", "reference:sd15-bf16",
     ["engine:sd15-attn", "engine:sd15-attn-lowmem", "engine:sd15-attn-ckpt", "engine:sd15-default",
      "engine:sd15-lowmem", "engine:sd15-attn-compiled"]),
    ("SD 1.5, reference with its text embeddings precomputed", "reference:sd15-bf16-precompute",
     ["engine:sd15-attn", "engine:sd15-attn-lowmem"]),
    ("SD 1.5, reference with checkpointing", "reference:sd15-bf16-ckpt",
     ["engine:sd15-attn-lowmem", "engine:sd15-attn-ckpt", "engine:sd15-attn-lowmem-fp8"]),
    ("SDXL", "reference:sdxl-bf16", ["engine:sdxl-attn", "engine:sdxl-attn-lowmem", "engine:sdxl-attn-ckpt",
                                     "engine:sdxl-attn-fp8", "engine:sdxl-attn-lowmem-fp8"]),
    ("SDXL, reference with checkpointing", "reference:sdxl-bf16-ckpt",
     ["engine:sdxl-attn-lowmem", "engine:sdxl-attn-ckpt", "engine:sdxl-attn-lowmem-fp8"]),
]
"""Ratios reported: each of ours against the reference mode named first."""


# ---------------------------------------------------------------- models and data

def build_model(family: str, work: Path, tokenizer: Path, tiny: bool) -> Path:
    """The seeded diffusers folder of ``family`` (kept when already there)."""
    folder = work / (f"{family}-tiny" if tiny else family)
    if (folder / "model_index.json").is_file():
        return folder
    if family == "sdxl":
        from family_memory import build_folder

        return build_folder("sdxl", folder, tokenizer, tiny)
    if not tiny:
        from sd15 import build_sd15

        return build_sd15(folder, tokenizer)
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_model import build_tiny_components

    from dreambooth.models.families import family_named
    from dreambooth.models.pipeline import inference_pipeline
    from dreambooth.models.tokenizer import load_clip_tokenizer

    components = build_tiny_components(load_clip_tokenizer(tokenizer))
    inference_pipeline(family_named("sd1"), components).save_pretrained(str(folder))
    return folder


# ---------------------------------------------------------------- one run's command line

def engine_command(mode: str, a, model: Path, instance: Path, klass: Path, timing: Path, work: Path):
    """Write the run's config.json; returns the command line and the run's output folder."""
    from dreambooth.config import Concept, TrainConfig

    family, options = ENGINE_MODES[mode]
    model_dir = work / f"engine-{mode}"
    out = model_dir / "out"
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    wanted = {
        **ENGINE_COMMON,
        **options,
        "resolution": a.resolution or RESOLUTION[family],
        "max_steps": a.warmup + a.steps + 1,
        "model_name": f"bench-{mode}",
        "source_checkpoint": str(model),
        "tokenizer_dir": str(Path(a.tokenizer).resolve()),
        "output_dir": str(out),
    }
    dropped = sorted(k for k in wanted if k not in known)
    config = TrainConfig(**{k: v for k, v in wanted.items() if k in known})
    config.concepts = [Concept(instance_dir=str(instance), instance_prompt=INSTANCE_PROMPT, class_prompt=CLASS_PROMPT,
                               class_dir=str(klass), num_class_images=len(list(klass.glob("*.jpg"))))]
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / "config.json"
    path.write_text(json.dumps(config.to_dict(), indent=1))
    argv = [sys.executable, str(HERE / "engine_run.py"), str(timing), str(a.warmup), str(a.steps), str(path),
            ",".join(dropped)]
    return argv, out


def reference_command(mode: str, a, model: Path, instance: Path, klass: Path, timing: Path, work: Path):
    """The reference script's command line under ``--reference-main``, and its output folder."""
    family, script, flags = REFERENCE_MODES[mode]
    out = work / f"reference-{mode}"
    argv = [
        sys.executable, str(Path(__file__).resolve()), "--reference-main", str(timing), str(a.warmup), str(a.steps),
        str(Path(a.reference_dir) / script),
        "--pretrained_model_name_or_path", str(model),
        "--instance_data_dir", str(instance),
        "--class_data_dir", str(klass),
        "--with_prior_preservation", "--prior_loss_weight", "1.0",
        "--instance_prompt", INSTANCE_PROMPT, "--class_prompt", CLASS_PROMPT,
        "--num_class_images", str(len(list(klass.glob("*.jpg")))),
        "--resolution", str(a.resolution or RESOLUTION[family]), "--center_crop",
        "--learning_rate", str(LEARNING_RATE), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
        "--max_train_steps", str(a.warmup + a.steps + 1),
        "--checkpointing_steps", "100000000",
        "--output_dir", str(out), "--seed", "0",
        *REFERENCE_COMMON, *flags,
    ]
    if a.tiny:  # the CPU smoke run: no bf16 autocast on a CPU accelerator
        argv[argv.index("bf16")] = "no"
    return argv, out


def family_of_run(name: str) -> str:
    runner, mode = name.split(":", 1)
    return ENGINE_MODES[mode][0] if runner == "engine" else REFERENCE_MODES[mode][0]


# ---------------------------------------------------------------- what a run left behind

def inspect_lora(out: Path) -> dict:
    """Size of the newest .safetensors under ``out``, its tensor count, and how many up weights are non-zero."""
    files = sorted(out.rglob("*.safetensors"), key=lambda p: p.stat().st_mtime) if out.is_dir() else []
    if not files:
        return {"lora_file": None}
    from safetensors import safe_open

    path = files[-1]
    ups, moved, largest, tensors, dtypes = 0, 0, 0.0, 0, set()
    with safe_open(str(path), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            tensors += 1
            if any(s in key for s in ("lora_up", "lora.up", "lora_B")):
                t = f.get_tensor(key).float()
                dtypes.add(str(t.dtype))
                ups += 1
                top = float(t.abs().max())
                moved += top > 0
                largest = max(largest, top)
    return {"lora_file": path.name, "lora_mb": round(path.stat().st_size / 2**20, 2), "lora_tensors": tensors,
            "lora_up_tensors": ups, "lora_up_nonzero": moved, "lora_up_max": largest}


def read_events(log: Path) -> dict:
    """From an engine log: the ``started`` event, the losses of its step events, warnings and errors."""
    started, losses, notes = None, [], []
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        kind = event.get("event")
        if kind == "started":
            started = {k: event[k] for k in ("weights", "precision", "optimizer", "attention",
                                             "gradient_checkpointing", "channels_last", "cuda_graphs",
                                             "compiled_blocks", "compile_s") if k in event}
        elif kind == "step" and "loss" in event:
            losses.append(event["loss"])
        elif kind in ("warning", "error"):
            notes.append(f"{kind}: {str(event.get('message', event))[:400]}")
    return {"started": started, "losses": losses, "notes": notes}


def reference_losses(log: Path) -> list[float]:
    """The reference's progress-bar losses (``loss=…`` in its tqdm postfix)."""
    import re

    return [float(m) for m in re.findall(r"loss=([0-9.eE+-]+|nan|inf)", log.read_text(errors="replace"))]


def traceback_of(log: Path) -> str | None:
    lines = log.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines):
        if "Traceback (most recent call last)" in line:
            return "\n".join(lines[i:i + 80])[-6000:]
    return None


def summarize(name: str, timing: dict, launch: float, rc: int, wall: float, steps: int, log: Path, out: Path) -> dict:
    row: dict = {"run": name, "rc": rc, "wall_s": round(wall, 1)}
    if "timed_start" in timing and "timed_end" in timing:
        row["steps_per_s"] = round(steps / (timing["timed_end"] - timing["timed_start"]), 3)
    for key, field in (("peak_bytes", "peak_gb"), ("peak_steps_bytes", "steps_peak_gb"),
                       ("peak_before_steps_bytes", "before_steps_peak_gb"), ("peak_reserved_bytes", "reserved_gb")):
        if key in timing:
            row[field] = round(timing[key] / 1e9, 3)
    phases = {key.removeprefix("peak_phase_").removesuffix("_bytes"): round(value / 1e9, 3)
              for key, value in timing.items() if key.startswith("peak_phase_")}
    if phases:
        row["phase_peaks_gb"] = phases
        row["phase_reserved_gb"] = {key.removeprefix("reserved_phase_").removesuffix("_bytes"): round(value / 1e9, 3)
                                    for key, value in timing.items() if key.startswith("reserved_phase_")}
    if "first_step_done" in timing:
        row["first_step_s"] = round(timing["first_step_done"] - launch, 1)
    if "save_start" in timing and "save_end" in timing:
        row["save_s"] = round(timing["save_end"] - timing["save_start"], 2)
    row["steps_seen"] = timing.get("steps_seen")
    if name.startswith("engine:"):
        events = read_events(log)
        losses = events.pop("losses")
        row.update(events)
    else:
        losses = reference_losses(log)
    row["losses_logged"] = len(losses)
    row["losses_finite"] = bool(losses) and all(math.isfinite(v) for v in losses)
    row["last_losses"] = [round(v, 5) for v in losses[-3:]]
    row.update(inspect_lora(out))
    tb = traceback_of(log)
    if tb:
        row["traceback"] = tb
    return row


# ---------------------------------------------------------------- the reference's wrapper

def reference_main(argv: list[str]) -> None:
    """Execute a reference script as ``__main__`` with the clock on its UNet and its save; stop after the save."""
    import runpy

    from reference_run import PERSISTENT_FLAG, keep_loader_workers
    from timing import StepClock

    timing_path, warmup, timed, script, *args = argv
    clock = StepClock(Path(timing_path), int(warmup), int(timed))
    clock.mark("process_start", time.time())
    import diffusers
    from diffusers.loaders import lora_pipeline

    unet_forward = diffusers.UNet2DConditionModel.forward

    def timed_forward(self, *a, **k):
        clock.at_step()
        return unet_forward(self, *a, **k)

    diffusers.UNet2DConditionModel.forward = timed_forward

    class SavedLora(Exception):
        pass

    for mixin in (lora_pipeline.StableDiffusionLoraLoaderMixin, lora_pipeline.StableDiffusionXLLoraLoaderMixin):
        save = mixin.save_lora_weights.__func__

        def timed_save(cls, *a, _save=save, **k):
            clock.mark("save_start")
            _save(cls, *a, **k)
            clock.mark("save_end")
            if clock.index > int(warmup) + int(timed):  # the final save: training is over
                raise SavedLora

        mixin.save_lora_weights = classmethod(timed_save)
    if PERSISTENT_FLAG in args:
        args = [x for x in args if x != PERSISTENT_FLAG]
        keep_loader_workers()
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    except SavedLora:
        pass
    finally:
        clock.write(runner="reference")
    os._exit(0)  # its data-loader workers and trackers need no orderly shutdown


# ---------------------------------------------------------------- tables

def environment() -> dict:
    import torch

    env = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
           "python": platform.python_version(), "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}
    for name in ("diffusers", "transformers", "accelerate", "peft", "bitsandbytes"):
        try:
            env[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001 (a missing optional package is reported)
            env[name] = f"absent ({type(exc).__name__})"
    return env


def table(rows: list[dict], env: dict) -> str:
    head = ("| run | rc | steps/s | peak GB | steps' peak GB | reserved GB | first step s | save s | LoRA MB | up ≠ 0 "
            "| losses finite | engine ran |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n")
    lines = []
    for r in rows:
        s = r.get("started") or {}
        ran = (f"{s.get('weights')}/{s.get('precision')}, {s.get('optimizer')}, graphs {s.get('cuda_graphs')}, "
               f"ckpt {s.get('gradient_checkpointing')}, compiled {s.get('compiled_blocks')}") if s else "–"
        lines.append(f"| {r['run']} | {r['rc']} | {r.get('steps_per_s', '–')} | {r.get('peak_gb', '–')} | "
                     f"{r.get('steps_peak_gb', '–')} | {r.get('reserved_gb', '–')} | {r.get('first_step_s', '–')} | "
                     f"{r.get('save_s', '–')} | "
                     f"{r.get('lora_mb', '–')} | "
                     f"{r.get('lora_up_nonzero', '–')}/{r.get('lora_up_tensors', '–')} | {r.get('losses_finite')} | "
                     f"{ran} |")
    by = {r["run"]: r for r in rows}
    notes = []
    for label, ref, ours in PAIRS:
        for name in ours:
            if ref in by and name in by and "steps_per_s" in by[ref] and "steps_per_s" in by[name]:
                notes.append(f"- {label}: {name} / {ref} = **{by[name]['steps_per_s'] / by[ref]['steps_per_s']:.2f}×** "
                             f"steps/s (peak {by[name].get('peak_gb')} GB vs {by[ref].get('peak_gb')} GB; steps' own "
                             f"{by[name].get('steps_peak_gb')} vs {by[ref].get('steps_peak_gb')} GB)")
    for r in rows:
        if r.get("phase_peaks_gb"):
            notes.append(f"- {r['run']}: peak per phase (GB, allocated / reserved): " + ", ".join(
                f"{k} {v} / {r['phase_reserved_gb'].get(k, '–')}" for k, v in r["phase_peaks_gb"].items()))
    envline = ", ".join(f"{k} {v}" for k, v in env.items())
    return f"{envline}\n\n{head}" + "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


# ---------------------------------------------------------------- main

def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--reference-main":
        reference_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lora-bench"))
    ap.add_argument("--tokenizer", type=Path, default=REPO / "build" / "tokenizer")
    ap.add_argument("--reference-dir", type=Path, default=REPO / "build" / "reference")
    ap.add_argument("--runs", nargs="+", default=[])
    ap.add_argument("--sweep", action="store_true", help="add every SWEEP mode; 10 + 20 steps, 20 class images")
    ap.add_argument("--memory", action="store_true", help="add every MEMORY mode")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--class-images", type=int, default=200)
    ap.add_argument("--timeout", type=int, default=400, help="seconds per run")
    ap.add_argument("--lanes", type=int, default=1, help="runs at a time (the sweep's correctness only: runs side by "
                    "side share the GPU, so their steps/s are not measurements)")
    ap.add_argument("--resolution", type=int, default=0, help="override the family's (the --tiny run: 64)")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny models, for a CPU run of the plumbing")
    a = ap.parse_args()
    if a.sweep:
        a.runs = [*a.runs, *(f"engine:{m}" for m in SWEEP)]
        a.warmup, a.steps, a.class_images = 10, 20, min(a.class_images, 20)
    if a.memory:
        a.runs = [*a.runs, *(r for r in MEMORY if r not in a.runs)]
    if a.tiny and not a.resolution:
        a.resolution = 64

    from dataset import build_dataset

    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if not (a.tokenizer / "vocab.json").is_file():
        from dreambooth.models.tokenizer import find_tokenizer_dir

        a.tokenizer = find_tokenizer_dir(None, a.tokenizer)
    instance, klass = build_dataset(a.work / f"data-{a.class_images}", classes=a.class_images)
    models = {f: build_model(f, a.work, a.tokenizer, a.tiny) for f in sorted({family_of_run(n) for n in a.runs})}
    env = environment()
    env["build_s"] = round(time.time() - t0, 1)
    print(f"built {sorted(models)} + data in {env['build_s']} s; {env}", flush=True)

    pending = list(a.runs)
    running: list[tuple] = []
    rows: list[dict] = []
    tails: list[str] = []

    def start(name: str):
        runner, mode = name.split(":", 1)
        timing = a.work / "timing" / f"{runner}-{mode}.json"
        timing.unlink(missing_ok=True)
        maker = engine_command if runner == "engine" else reference_command
        argv, out = maker(mode, a, models[family_of_run(name)], instance, klass, timing, a.work)
        if out.is_dir():
            import shutil

            shutil.rmtree(out)
        log = a.work / "logs" / f"{runner}-{mode}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        handle = open(log, "w")
        proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return (name, proc, handle, time.time(), timing, log, out)

    while pending or running:
        while pending and len(running) < max(1, a.lanes):
            running.append(start(pending.pop(0)))
        time.sleep(0.5)
        for item in list(running):
            name, proc, handle, launch, timing, log, out = item
            rc = proc.poll()
            if rc is None and time.time() - launch > a.timeout:
                proc.kill()
                rc = 124
                proc.wait()
            if rc is None:
                continue
            running.remove(item)
            handle.close()
            data = json.loads(timing.read_text()) if timing.is_file() else {}
            row = summarize(name, data, launch, rc, time.time() - launch, a.steps, log, out)
            row["concurrent_lanes"] = a.lanes
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
            if "traceback" in row:
                print(row["traceback"][-3000:], flush=True)
            lines = log.read_text(errors="replace").splitlines()
            tails.append(f"===== {name} rc={rc}\n" + "\n".join(line[-400:] for line in lines[-80:]))
            (a.out / "results.json").write_text(json.dumps(
                {"environment": env, "warmup": a.warmup, "steps": a.steps, "class_images": a.class_images,
                 "lanes": a.lanes, "rows": rows}, indent=1))
            (a.out / "logs.txt").write_text("\n".join(tails))
    md = table(rows, env)
    (a.out / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
