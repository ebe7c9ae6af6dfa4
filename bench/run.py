"""The GPU benchmark: one command builds the SD 1.5-architecture model and the dataset once, then runs the
reference trainer and ours on identical work, each in its own process, and writes a markdown table + JSON.

    python bench/run.py --reference /path/to/train_dreambooth.py --out results/ [--runs NAME ...]

A run is ``runner:mode`` (see ``RUNNERS``). Every reference mode has a ``-workers`` twin at the reference's
best loader settings (``REFERENCE_LOADER``); ratios and targets are judged against those, the default-flag rows
are kept beside them. Work: 512 px, prior preservation (B instance + B class images per
step), constant LR 5e-6, ``--warmup`` steps then ``--steps`` timed steps. Reported per run: steady-state
steps/s and images/s (instance + class images through the UNet), peak ``torch.cuda.max_memory_allocated``,
time to first step (process launch → end of step 1: imports, loading, caching, compilation), save time, and
MFU against 790 TFLOP/s at 2.41 TFLOP per 512 px UNet training sample.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(REPO))  # the engine and its shared pieces (tokenizer, configs)

PEAK_FLOPS = 790e12
FLOP_PER_SAMPLE = 2.41e12
INSTANCE_PROMPT, CLASS_PROMPT = "a photo of zwx dog", "a photo of dog"

REFERENCE_MODES = {
    "bf16-b1": ["--mixed_precision", "bf16", "--train_batch_size", "1"],
    "bf16-b8": ["--mixed_precision", "bf16", "--train_batch_size", "8"],
    "bf16-b16": ["--mixed_precision", "bf16", "--train_batch_size", "16"],
    "lowmem-b1": [
        "--mixed_precision",
        "fp16",
        "--use_8bit_adam",
        "--gradient_checkpointing",
        "--train_batch_size",
        "1",
    ],
}
REFERENCE_LOADER = ["--dataloader_num_workers", "4", "--bench-persistent-workers"]
"""The reference's best loader settings: its own ``--dataloader_num_workers`` (it decodes two JPEGs a step on the
training thread without it), plus ``persistent_workers=True`` on its DataLoader, which the script has no flag for
and ``reference_run.py`` sets (otherwise the workers restart at every epoch, every 13 steps at batch 16)."""
REFERENCE_MODES.update({f"{mode}-workers": [*argv, *REFERENCE_LOADER] for mode, argv in list(REFERENCE_MODES.items())})

OURS_LIKE_MODES = {
    "speed-b1": ["--batch", "1"],
    "speed-b1-graph": ["--batch", "1", "--graph"],
    "speed-b8": ["--batch", "8"],
    "speed-b8-graph": ["--batch", "8", "--graph"],
    "speed-b16-graph": ["--batch", "16", "--graph"],
    "speed-b32-graph": ["--batch", "32", "--graph"],
    "speed-b1-eager-optimizer": ["--batch", "1", "--no-optim-compile"],
    "speed-b1-fp32-torchfused": ["--batch", "1", "--weights", "fp32-autocast", "--optimizer", "torch-fused"],
    "speed-b1-nchw": ["--batch", "1", "--no-channels-last"],
    "speed-b1-bf16state": ["--batch", "1", "--state-dtype", "bf16"],
    "speed-b1-compiled": ["--batch", "1", "--compile", "default"],
    "speed-b1-blocks": ["--batch", "1", "--compile", "default", "--compile-scope", "blocks"],
    "speed-b16-blocks-graph": ["--batch", "16", "--compile", "default", "--compile-scope", "blocks", "--graph"],
    "lowmem-b1": ["--batch", "1", "--optimizer", "adamw8bit", "--fused-backward", "--checkpointing"],
    "lowmem-b1-nockpt": ["--batch", "1", "--optimizer", "adamw8bit", "--fused-backward"],
    "lowmem-b1-graph": ["--batch", "1", "--optimizer", "adamw8bit", "--checkpointing", "--graph"],
}
RUNNERS = {"reference": REFERENCE_MODES, "ours-like": OURS_LIKE_MODES}
PAIRS = [
    ("speed b1", "reference:bf16-b1-workers", ["ours-like:speed-b1", "engine:speed-b1"]),
    ("speed b8", "reference:bf16-b8-workers", ["ours-like:speed-b8", "engine:speed-b8"]),
    ("low-memory b1", "reference:lowmem-b1-workers", ["ours-like:lowmem-b1", "engine:lowmem-b1"]),
    ("speed b1, reference with its default loader", "reference:bf16-b1", ["engine:speed-b1"]),
    ("speed b8, reference with its default loader", "reference:bf16-b8", ["engine:speed-b8"]),
    ("low-memory b1, reference with its default loader", "reference:lowmem-b1", ["engine:lowmem-b1"]),
]
"""Ratios reported: against the reference at its best loader settings first (what targets are judged on), then
against its default flags, beside them."""
DEFAULT_RUNS = ["reference:bf16-b1-workers", "reference:bf16-b1", "engine:speed-b1"]


def batch_of(name: str, argv: list[str]) -> int:
    """The per-step batch (instance images) of run ``name`` with command line ``argv``."""
    runner, _, mode = name.partition(":")
    if runner == "engine":
        from engine_run import ENGINE_MODES

        return ENGINE_MODES[mode]["batch_size"] * ENGINE_MODES[mode].get("processes", 1)  # all processes' images
    for flag in ("--train_batch_size", "--batch"):
        if flag in argv:
            return int(argv[argv.index(flag) + 1])
    return 1


def command(runner: str, mode: str, a, model: Path, instance: Path, klass: Path, timing: Path, work: Path) -> list[str]:
    """The command line of one run."""
    if runner == "reference":
        out = work / "reference-out"
        return [
            sys.executable,
            str(HERE / "reference_run.py"),
            str(timing),
            str(a.warmup),
            str(a.steps),
            str(a.reference),
            "--pretrained_model_name_or_path",
            str(model),
            "--instance_data_dir",
            str(instance),
            "--class_data_dir",
            str(klass),
            "--with_prior_preservation",
            "--prior_loss_weight",
            "1.0",
            "--instance_prompt",
            INSTANCE_PROMPT,
            "--class_prompt",
            CLASS_PROMPT,
            "--num_class_images",
            str(len(list(klass.glob("*.jpg")))),
            "--resolution",
            "512",
            "--learning_rate",
            "5e-6",
            "--lr_scheduler",
            "constant",
            "--lr_warmup_steps",
            "0",
            "--max_train_steps",
            str(a.warmup + a.steps + 1),
            "--checkpointing_steps",
            "100000000",
            "--output_dir",
            str(out),
            "--seed",
            "0",
            *REFERENCE_MODES[mode],
        ]
    if runner == "ours-like":
        return [
            sys.executable,
            str(HERE / "ours_like.py"),
            "--model",
            str(model),
            "--instance",
            str(instance),
            "--class-dir",
            str(klass),
            "--timing",
            str(timing),
            "--warmup",
            str(a.warmup),
            "--steps",
            str(a.steps),
            "--save",
            str(work / "ours-like.safetensors"),
            *OURS_LIKE_MODES[mode],
        ]
    if runner == "engine":
        from engine_run import engine_command

        return engine_command(mode, a, model, instance, klass, timing, work)
    raise SystemExit(f"unknown runner {runner}")


def summarize(name: str, argv: list[str], timing: dict, launch: float, rc: int, wall: float, steps: int) -> dict:
    """One row of results from a run's timing marks."""
    row = {"run": name, "rc": rc, "wall_s": round(wall, 1), "batch": batch_of(name, argv)}
    if "timed_start" in timing and "timed_end" in timing:
        sps = steps / (timing["timed_end"] - timing["timed_start"])
        ips = sps * 2 * row["batch"]
        row.update(
            steps_per_s=round(sps, 3), images_per_s=round(ips, 2), mfu=round(ips * FLOP_PER_SAMPLE / PEAK_FLOPS, 4)
        )
    if "peak_bytes" in timing:
        row["peak_gb"] = round(timing["peak_bytes"] / 1e9, 2)
    if "first_step_done" in timing:
        row["first_step_s"] = round(timing["first_step_done"] - launch, 1)
    if "save_start" in timing and "save_end" in timing:
        row["save_s"] = round(timing["save_end"] - timing["save_start"], 1)
    for key in ("compile_s", "cache_s", "last_losses"):
        if key in timing:
            row[key] = timing[key]
    return row


def environment() -> dict:
    """GPU and library versions of this machine."""
    import torch

    env = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    for name in ("diffusers", "transformers", "accelerate", "bitsandbytes"):
        try:
            env[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001 (a missing optional package is reported, not fatal)
            env[name] = f"absent ({type(exc).__name__})"
    return env


def table(rows: list[dict], env: dict) -> str:
    """The markdown table plus ratios of each of ours to the reference's closest mode."""
    head = (
        "| run | batch | steps/s | images/s | MFU | peak GB | first step s | save s |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        lines.append(
            f"| {r['run']}{'' if r['rc'] == 0 else ' (rc ' + str(r['rc']) + ')'} | {r['batch']} | "
            f"{r.get('steps_per_s', '–')} | {r.get('images_per_s', '–')} | "
            f"{format(r['mfu'], '.1%') if 'mfu' in r else '–'} | {r.get('peak_gb', '–')} | "
            f"{r.get('first_step_s', '–')} | {r.get('save_s', '–')} |"
        )
    by_name = {r["run"]: r for r in rows}
    notes = []
    for label, ref, ours_names in PAIRS:
        for ours in ours_names:
            if ref in by_name and ours in by_name and "steps_per_s" in by_name[ref] and "steps_per_s" in by_name[ours]:
                ratio = by_name[ours]["steps_per_s"] / by_name[ref]["steps_per_s"]
                notes.append(
                    f"- {label}: {ours} / {ref} = **{ratio:.2f}×** steps/s "
                    f"({by_name[ours].get('peak_gb', '?')} GB vs {by_name[ref].get('peak_gb', '?')} GB)"
                )
    for loader, tuned in (("best loader", True), ("default loader", False)):
        ref_best = _best(rows, lambda name, tuned=tuned: name.startswith("reference:") and name.endswith("-workers")
                         == tuned)
        for prefix in ("ours-like:", "engine:"):
            best = _best(rows, lambda name, prefix=prefix: name.startswith(prefix))
            if ref_best and best:
                ratio = best["images_per_s"] / ref_best["images_per_s"]
                notes.append(
                    f"- best large batch ({loader} reference): {best['run']} {best['images_per_s']} images/s vs "
                    f"{ref_best['run']} {ref_best['images_per_s']} images/s = **{ratio:.2f}×**"
                )
    envline = ", ".join(f"{k} {v}" for k, v in env.items())
    return f"{envline}\n\n{head}" + "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def _best(rows: list[dict], pick) -> dict | None:
    """The row with the most images/s among those whose run name ``pick`` accepts."""
    return max((r for r in rows if pick(r["run"]) and "images_per_s" in r), key=lambda r: r["images_per_s"],
               default=None)


def main() -> None:
    """Build once, run everything asked for, write results.json and results.md into --out."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", type=Path, help="diffusers' examples/dreambooth/train_dreambooth.py")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dreambooth-bench"))
    ap.add_argument("--tokenizer", type=Path, default=REPO / "build" / "tokenizer")
    ap.add_argument("--runs", nargs="+", default=DEFAULT_RUNS)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--timeout", type=int, default=400, help="seconds per run")
    a = ap.parse_args()

    from dataset import build_dataset
    from sd15 import build_sd15, parameter_counts

    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if not (a.tokenizer / "vocab.json").is_file():  # made here from open_clip's vocabulary (the GPU box has none)
        from dreambooth.models.tokenizer import find_tokenizer_dir

        a.tokenizer = find_tokenizer_dir(None, a.tokenizer)
    instance, klass = build_dataset(a.work / "data")
    model = build_sd15(a.work / "sd15", a.tokenizer)
    env = environment()
    env["weights"] = parameter_counts(model)
    print(f"built model + data in {time.time() - t0:.0f} s; {env}", flush=True)

    rows, log_tail = [], []
    results_path = a.out / "results.json"
    for name in a.runs:
        runner, mode = name.split(":", 1)
        timing_path = a.work / "timing" / f"{runner}-{mode}.json"
        timing_path.unlink(missing_ok=True)
        argv = command(runner, mode, a, model, instance, klass, timing_path, a.work)
        log_path = a.work / "logs" / f"{runner}-{mode}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        launch = time.time()
        with open(log_path, "w") as log:
            try:
                rc = subprocess.run(
                    argv,
                    check=False,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=a.timeout,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                ).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        wall = time.time() - launch
        timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
        row = summarize(name, argv, timing, launch, rc, wall, a.steps)
        rows.append(row)
        print(json.dumps(row), flush=True)
        lines = log_path.read_text(errors="replace").splitlines()
        log_tail.append(f"===== {name} rc={rc}\n" + "\n".join(line[-300:] for line in lines[-60:]))
        results_path.write_text(
            json.dumps({"environment": env, "warmup": a.warmup, "steps": a.steps, "rows": rows}, indent=1)
        )
        (a.out / "logs.txt").write_text("\n".join(log_tail))
    md = table(rows, env)
    (a.out / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
