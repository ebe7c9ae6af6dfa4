"""What the fast paths learn, on a GPU: the demo's DreamBooth run (``dreambooth.demo.run``) trained through the
engine on CUDA once per mode -- plain fp32, the speed switches, the low-memory switches -- with everything else
equal (seed, data, steps). Reported per mode: the loss curve in windows of ``--window`` steps and its ratio to
fp32's, and the demo's fidelity table (subject fidelity, recontextualisation, leakage, class drift).

    python bench/fidelity.py --out results/fidelity [--modes fp32 speed lowmem] [--tokenizer DIR]
    python bench/fidelity.py --out results/all --merge results/fp32 results/lowmem ...   # one table of several runs

Modes run one after another in one process; to run them side by side, start one process per mode and merge their
``results.json`` files afterwards.

Stated tolerance (checked and printed, never asserted in tests): every window's mean loss within 10% of fp32's,
and the demo's scores within 15 points of fp32's (32 samples per prompt: one sample is 3 points).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

MODES = {
    "fp32": {"mixed_precision": "no", "weights_dtype": "fp32"},
    "speed": {"mixed_precision": "bf16", "weights_dtype": "bf16", "cuda_graphs": True, "compile_optimizer": True,
              "channels_last": True, "log_every": 10},
    "lowmem": {"mixed_precision": "bf16", "weights_dtype": "bf16", "optimizer": "adamw_8bit",
               "gradient_checkpointing": True, "optimizer_in_backward": True, "compile_optimizer": True,
               "log_every": 10},
}
# The low-memory mode with one of its differences from fp32 at a time (which one moves the loss?)
ABLATIONS = {
    "fp32-noclip": {**MODES["fp32"], "max_grad_norm": 0.0},
    "lowmem-adamw": {**MODES["lowmem"], "optimizer": "adamw"},
    "lowmem-clipped": {**MODES["lowmem"], "optimizer_in_backward": False},
    "lowmem-nockpt": {**MODES["lowmem"], "gradient_checkpointing": False},
    "bf16-only": {**MODES["fp32"], "mixed_precision": "bf16", "weights_dtype": "bf16"},
}
MODES.update(ABLATIONS)
LOSS_TOLERANCE = 0.10
SCORE_TOLERANCE = 0.15


def windows(losses: list[float], size: int) -> list[float]:
    """Mean loss of each ``size``-step window."""
    return [sum(losses[i:i + size]) / len(losses[i:i + size]) for i in range(0, len(losses), size)]


def main() -> None:
    """Train the demo once per mode and write results.json + results.md under ``--out``."""
    from dreambooth.demo.run import parse_overrides, run_demo

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--modes", nargs="+", default=["fp32", "speed", "lowmem"], choices=list(MODES))
    parser.add_argument("--tokenizer", default=str(HERE.parent / "build" / "tokenizer"))
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a DemoSettings field")
    parser.add_argument("--merge", type=Path, nargs="+", default=[], metavar="DIR",
                        help="train nothing: one table of these earlier runs' results.json")
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.merge:
        results = {}
        for folder in a.merge:
            for mode, result in json.loads((folder / "results.json").read_text()).items():
                if mode in results:
                    parser.error(f"mode {mode!r} is in two of the merged runs")
                results[mode] = result
        windows_used = {result.get("window", a.window) for result in results.values()}
        if len(windows_used) > 1:
            parser.error(f"the merged runs used different --window sizes: {sorted(windows_used)}")
        write_tables(results, a.out, windows_used.pop())
        return
    base = parse_overrides(a.set)
    results = {}
    for mode in a.modes:
        report = run_demo(a.out / mode, seed=a.seed, tokenizer_dir=a.tokenizer,
                          overrides={**base, "device": "cuda", "engine_options": MODES[mode]})
        results[mode] = {
            "rows": [dataclasses.asdict(r) for r in report.rows],
            "loss_windows": {run: windows(curve, a.window) for run, curve in report.losses.items()},
            "seconds": round(report.seconds, 1),
            "window": a.window,
        }
        print(mode, json.dumps(results[mode]), flush=True)
        (a.out / "results.json").write_text(json.dumps(results, indent=1))
    write_tables(results, a.out, a.window)


def write_tables(results: dict, out: Path, window: int) -> None:
    """results.md (loss windows, their ratio to fp32's where fp32 ran, scores, verdicts) and results.json."""
    lines = [f"| mode | run | loss per {window} steps (ratio to fp32) | fidelity | recontext | leakage | drift |",
             "|---|---|---|---|---|---|---|"]
    verdicts = []
    for mode, result in results.items():
        for row in result["rows"]:
            if row["model"] == "base":
                continue
            curve = result["loss_windows"][row["model"]]
            ratios = ""
            if "fp32" in results:
                reference = results["fp32"]["loss_windows"][row["model"]]
                ratio = [x / y for x, y in zip(curve, reference)]
                ratios = " (" + ", ".join(f"{r:.2f}" for r in ratio) + ")"
                ref_row = next(r for r in results["fp32"]["rows"] if r["model"] == row["model"])
                within = all(abs(r - 1) <= LOSS_TOLERANCE for r in ratio) and all(
                    abs(row[k] - ref_row[k]) <= SCORE_TOLERANCE for k in ("fidelity", "recontext", "leakage"))
                verdicts.append(f"- {mode} / {row['model']}: {'within' if within else 'OUTSIDE'} tolerance")
            lines.append(f"| {mode} | {row['model']} | {', '.join(f'{x:.4f}' for x in curve)}{ratios} | "
                         f"{row['fidelity']:.0%} | {row['recontext']:.0%} | {row['leakage']:.0%} | "
                         f"{row['class_drift']:.2f} |")
    text = "\n".join(lines + [""] + verdicts) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(text)


if __name__ == "__main__":
    main()
