"""Resume snapshots: ``state/step_<N>/`` with the trained weights, optimizer and LR schedule, RNG states,
data order and step. A snapshot folder is written under a temporary name and renamed when complete, so a
crash mid-write never leaves one that looks usable."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

STEP_PREFIX = "step_"


@dataclass
class Snapshot:
    """What a resume needs, as loaded from disk."""

    step: int
    data_order: dict[str, int]
    fingerprint: dict[str, Any]
    folder: Path


def save_snapshot(
    state_dir: Path,
    step: int,
    models: dict[str, torch.nn.Module],
    training_state: dict[str, Any],
    data_order: dict[str, int],
    fingerprint: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``state_dir/step_<step>`` and keep only the newest ``keep`` snapshots."""
    from ..models.export import write_safetensors

    final = state_dir / f"{STEP_PREFIX}{step:08d}"
    temp = state_dir / f".{final.name}.partial"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    try:
        for name, model in models.items():
            # a tensor at a time to the CPU and the file: no copy of the model in host memory
            write_safetensors(temp / f"{name}.safetensors", {k: v.detach() for k, v in model.state_dict().items()})
        torch.save(
            {"training": training_state, "rng": _rng_states()},
            str(temp / "training.pt"),
        )
        (temp / "state.json").write_text(
            json.dumps({"step": step, "data_order": data_order, "fingerprint": fingerprint}, indent=2)
        )
        shutil.rmtree(final, ignore_errors=True)
        temp.rename(final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    for old in list_snapshots(state_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_snapshots(state_dir: Path) -> list[Path]:
    """Complete snapshots, oldest first."""
    if not state_dir.is_dir():
        return []
    return sorted(
        p for p in state_dir.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / "state.json").is_file()
    )


def latest_snapshot(state_dir: Path) -> Snapshot | None:
    """The newest complete snapshot's header, or None."""
    snapshots = list_snapshots(state_dir)
    if not snapshots:
        return None
    folder = snapshots[-1]
    data = json.loads((folder / "state.json").read_text())
    return Snapshot(step=data["step"], data_order=data["data_order"], fingerprint=data["fingerprint"], folder=folder)


def restore_snapshot(snapshot: Snapshot, models: dict[str, torch.nn.Module]) -> dict[str, Any]:
    """Load the weights and RNG states from ``snapshot``; returns the optimizer/schedule state to restore."""
    from safetensors.torch import load_file

    for name, model in models.items():
        model.load_state_dict(load_file(str(snapshot.folder / f"{name}.safetensors")))
    training = torch.load(str(snapshot.folder / "training.pt"), map_location="cpu", weights_only=False)
    _set_rng_states(training["rng"])
    return training["training"]


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
