"""Data-parallel training: two real processes (``torch.distributed.run``, gloo on the CPU) against one process.

Two processes with one batch each, gradients averaged before every update, must take the very updates of one
process that accumulates the same two batches (same images, same noise) -- the exact statement of what data
parallelism promises. Without the averaging, process 0 would learn from its own batches only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from dreambooth.engine import run
from dreambooth.events import CANCEL_FILE, Events
from dreambooth.models.read import read_tensors

REPO = Path(__file__).resolve().parent.parent


def _launch(config, model_dir: Path, processes: int = 2, wait: bool = True):
    """``config`` trained by ``processes`` processes of ``python -m dreambooth train`` under torch's launcher."""
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    # faulthandler: should a process abort, it prints every Python thread's stack (the flake below)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "dreambooth", "train", str(path), "--json"]
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if "terminate called without an active exception" in done.stderr:
        # Seen twice in ~40 launches inside full suite runs, never alone (153 launches alone, 2026-12-07): a process
        # aborts inside C++ right after loading the model. Launched once more, so the test keeps judging what the
        # processes compute; the aborted launch's stderr (with faulthandler's stacks) goes to the warnings summary,
        # the evidence for finding the cause.
        warnings.warn(f"a two-process launch aborted and was retried; its stderr:\n{done.stderr[-6000:]}",
                      stacklevel=2)
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    return done


@pytest.mark.parametrize("weights_dtype", ["fp32", "bf16"])  # torch's AdamW per tensor; one flat bf16 buffer
def test_two_processes_take_the_updates_of_one_process_accumulating_both_batches(make_config, tmp_path, weights_dtype):
    options = dict(max_steps=3, batch_size=1, prior_preservation=True, learning_rate=1e-3, save_dtype="fp32",
                   weights_dtype=weights_dtype)
    single = run(make_config(gradient_accumulation=2, **options), tmp_path / "one" / "zwx", Events())
    done = _launch(make_config(gradient_accumulation=1, **options), tmp_path / "two" / "zwx")
    assert done.returncode == 0, done.stderr[-6000:]

    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3]  # process 0 alone reports
    assert not [e for e in events if e["event"] == "warning" and "drifted" in e["message"]]  # copies stay equal
    checkpoints = sorted((tmp_path / "two" / "zwx" / "checkpoints").glob("*.safetensors"))
    assert [p.name for p in checkpoints] == ["zwx_3.safetensors"]  # and alone saves

    base = read_tensors(Path(make_config().source_checkpoint))
    ours, theirs = read_tensors(checkpoints[0]), read_tensors(single.checkpoints[-1])
    trained = [k for k in ours if k.startswith("model.diffusion_model.") and not torch.equal(ours[k], base[k])]
    assert len(trained) > 100  # the UNet learnt ...
    # ... what one process accumulating both batches learnt: the sums run in another order, which AdamW's
    # division by tiny second moments magnifies for a few weights, so the whole UNet is compared
    apart = sum(float((ours[k] - theirs[k]).square().sum()) for k in trained) ** 0.5
    moved = sum(float((theirs[k] - base[k]).square().sum()) for k in trained) ** 0.5
    # bf16: each gradient is itself rounded to bf16, and one process accumulating rounds other sums than two
    # averaging; measured 0.08% (fp32) and 7.8% (bf16) apart; 95% (fp32) when the averaging is left out, and then
    # the copies differ between the processes (the drift warning above)
    assert apart < {"fp32": 0.01, "bf16": 0.2}[weights_dtype] * moved, (apart, moved)


def test_optimizer_in_backward_on_several_processes_says_what_to_change_once(make_config, tmp_path):
    done = _launch(make_config(optimizer_in_backward=True, weights_dtype="bf16"), tmp_path / "zwx")
    assert done.returncode != 0
    errors = [json.loads(line) for line in done.stdout.splitlines() if '"error"' in line]
    assert len(errors) == 1  # process 0 reports; process 1 only says it on its stderr
    assert "optimizer_in_backward cannot run on 2 processes" in errors[0]["message"]
    assert "Turn optimizer_in_backward off" in errors[0]["advice"]
    logged = (tmp_path / "zwx" / "logs" / "events.jsonl").read_text().splitlines()
    assert sum('"error"' in line for line in logged) == 1
    assert "error: optimizer_in_backward cannot run" in done.stderr


def test_a_cancel_while_process_0_draws_class_images_stops_every_process(make_config, tmp_path):
    """Process 1 waits for process 0's preparation; a cancel there must release it, not leave it waiting."""
    model_dir = tmp_path / "zwx"
    config = make_config(prior_preservation=True, concept={"num_class_images": 64, "class_infer_steps": 4})
    process = _launch(config, model_dir, wait=False)
    try:
        for line in process.stdout:
            if '"Generating class images"' in line:
                (model_dir / CANCEL_FILE).touch()
                break
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, err[-3000:]
    finished = [json.loads(line) for line in out.splitlines() if '"finished"' in line]
    assert len(finished) == 1 and finished[0]["cancelled"]
    assert not list(model_dir.glob("checkpoints/*.safetensors"))
