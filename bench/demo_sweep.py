"""The demo's DreamBooth run (``dreambooth.demo.run``) under several settings and seeds, side by side.

    python bench/demo_sweep.py --out OUT --seeds 0 1 2 --parallel 15 \\
        --setting 'cosine=engine_options={"lr_scheduler": "cosine"}' --setting 'base='

Each ``--setting NAME=OVERRIDES`` is a ``;``-separated list (so no ``;`` inside a value) of ``FIELD=JSON`` overrides of
:class:`dreambooth.demo.run.DemoSettings` (empty: the defaults). Every (setting, seed) is one process
(``OMP_NUM_THREADS=1``, ``--parallel`` at a time); the device defaults to CUDA when there is one. Writes each
process's log (``OUT/logs``), ``results.md`` (a table per ``--row`` model, the prior-preservation one by default:
one row per setting, fidelity / recontextualisation / leakage per seed) and ``results.json`` (the same, by model,
setting and seed). ``--checkpoint``/``--config-dir`` run it on another base model (the SDXL-shaped one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def command(out: Path, name: str, overrides: str, seed: int, tokenizer: str, device: str,
            model: tuple[str, str] = ("", "")) -> list[str]:
    """The demo's command line for one (setting, seed); ``model``: another base model's checkpoint and config folder
    (empty: the shipped demo model)."""
    sets = [f'device="{device}"'] + [item for item in overrides.split(";") if item]
    args = [sys.executable, "-m", "dreambooth.demo.run", str(out / "runs" / f"{name}-s{seed}"), "--seed", str(seed),
            "--json"]
    if tokenizer:
        args += ["--tokenizer-dir", tokenizer]
    checkpoint, config_dir = model
    if checkpoint:
        args += ["--checkpoint", checkpoint] + (["--config-dir", config_dir] if config_dir else [])
    for item in sets:
        args += ["--set", item]
    return args


def scores(log: Path, model: str = "prior") -> dict | None:
    """The row of ``model`` ('prior', 'no prior', 'lora prior') in a finished demo's JSON line, with the run's
    seconds; None if it failed."""
    for line in log.read_text().splitlines():
        try:
            report = json.loads(line)
            row = next(r for r in report["rows"] if r["model"] == model)
            return {**row, "seconds": report["seconds"]}
        except (ValueError, TypeError, KeyError, StopIteration):  # not the report line
            continue
    return None


def main() -> None:
    """Run every (setting, seed) and write the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--setting", action="append", required=True, metavar="NAME=OVERRIDES")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--tokenizer", default=str(REPO / "build" / "tokenizer"))
    parser.add_argument("--device", default="")
    parser.add_argument("--row", nargs="+", default=["prior"], choices=["prior", "no prior", "lora prior"],
                        help="the demo models whose scores the tables show (one table each)")
    parser.add_argument("--checkpoint", default="", help="run the demo on this base model instead of the shipped one")
    parser.add_argument("--config-dir", default="", help="the diffusers config folder of --checkpoint")
    a = parser.parse_args()
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = dict(item.partition("=")[::2] for item in a.setting)
    if len(settings) < len(a.setting):
        parser.error("two --setting share a name")
    (a.out / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    queue = [(name, seed) for name in settings for seed in a.seeds]
    running: list[tuple[subprocess.Popen, Path]] = []
    started = time.time()
    while queue or running:
        while queue and len(running) < a.parallel:
            name, seed = queue.pop(0)
            log = a.out / "logs" / f"{name}-s{seed}.log"
            with log.open("w") as handle:
                cmd = command(a.out, name, settings[name], seed, a.tokenizer, device, (a.checkpoint, a.config_dir))
                running.append((subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO), log))
        time.sleep(2)
        running = [(p, log) for p, log in running if p.poll() is None]
    results = {row: {name: {seed: scores(a.out / "logs" / f"{name}-s{seed}.log", row) for seed in a.seeds}
                     for name in settings} for row in a.row}
    lines = [f"Demo sweep on {device}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{time.time() - started:.0f} s{f', base model {a.checkpoint}' if a.checkpoint else ''}. Cells: "
             "fidelity / recontextualisation / leakage (%)."]
    for row, per_setting in results.items():
        lines += ["", f"The '{row}' model:", "",
                  "| setting | overrides | " + " | ".join(f"seed {s}" for s in a.seeds) + " |",
                  "|---|---|" + "---|" * len(a.seeds)]
        for name, per_seed in per_setting.items():
            cells = [f"{r['fidelity']:.0%} / {r['recontext']:.0%} / {r['leakage']:.0%}".replace("%", "") if r
                     else "failed" for r in per_seed.values()]
            lines.append(f"| {name} | `{settings[name] or 'defaults'}` | " + " | ".join(cells) + " |")
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    (a.out / "results.json").write_text(json.dumps({"settings": settings, "results": results}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
