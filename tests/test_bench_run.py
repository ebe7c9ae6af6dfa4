"""``bench/run.py`` judges the engine against the reference trainer at the reference's best loader settings, with
the default-flag rows kept beside them (numbers: the H200 run of issue 18, bench/run.py at 75534d3)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch.utils.data

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import reference_run  # noqa: E402
import run as bench  # noqa: E402

ROWS = [  # issue 18: reference given --dataloader_num_workers 4 beside its default flags, one invocation
    {"run": "reference:bf16-b1", "rc": 0, "batch": 1, "steps_per_s": 4.13, "images_per_s": 8.26},
    {"run": "reference:bf16-b1-workers", "rc": 0, "batch": 1, "steps_per_s": 4.27, "images_per_s": 8.54},
    {"run": "engine:speed-b1", "rc": 0, "batch": 1, "steps_per_s": 23.36, "images_per_s": 46.72},
    {"run": "reference:bf16-b16", "rc": 0, "batch": 16, "steps_per_s": 0.934, "images_per_s": 29.9},
    {"run": "reference:bf16-b16-workers", "rc": 0, "batch": 16, "steps_per_s": 1.572, "images_per_s": 50.3},
    {"run": "engine:speed-b16", "rc": 0, "batch": 16, "steps_per_s": 3.153, "images_per_s": 100.9},
]


def test_every_reference_mode_has_a_twin_at_its_best_loader_settings() -> None:
    for mode, argv in list(bench.REFERENCE_MODES.items()):
        if mode.endswith("-workers"):
            continue
        tuned = bench.REFERENCE_MODES[f"{mode}-workers"]
        workers = int(tuned[tuned.index("--dataloader_num_workers") + 1])
        assert tuned[: len(argv)] == argv and workers >= 2 and reference_run.PERSISTENT_FLAG in tuned
    assert "reference:bf16-b1-workers" in bench.DEFAULT_RUNS and "reference:bf16-b1" in bench.DEFAULT_RUNS


def test_ratios_are_against_the_tuned_reference_with_the_default_ones_beside() -> None:
    md = bench.table(ROWS, {"gpu": "NVIDIA H200"})
    assert "speed b1: engine:speed-b1 / reference:bf16-b1-workers = **5.47×**" in md
    assert "reference with its default loader: engine:speed-b1 / reference:bf16-b1 = **5.66×**" in md
    assert ("best large batch (best loader reference): engine:speed-b16 100.9 images/s vs "
            "reference:bf16-b16-workers 50.3 images/s = **2.01×**") in md
    assert "(default loader reference): engine:speed-b16 100.9 images/s vs reference:bf16-b16 29.9" in md


def test_the_wrapper_keeps_the_references_loader_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.utils.data.DataLoader, "__init__", torch.utils.data.DataLoader.__init__)
    reference_run.keep_loader_workers()
    assert torch.utils.data.DataLoader(range(4), num_workers=2).persistent_workers
    assert not torch.utils.data.DataLoader(range(4)).persistent_workers  # no workers: nothing to keep
    assert not torch.utils.data.DataLoader(range(4), num_workers=2, persistent_workers=False).persistent_workers
