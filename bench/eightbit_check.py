"""Our 8-bit AdamW (``dreambooth/train/speed/adamw8bit.py``) against bitsandbytes' block-wise 8-bit kernel, on a GPU.

Prints: whether the two 256-entry codes are the same, how far the weights of the two optimizers drift apart
over ``--steps`` steps on the same gradients (relative to how far they moved), and the time of one update of
``--elements`` weights for each (ours compiled by torch.compile). One JSON line at the end.

    python bench/eightbit_check.py [--elements 859520964] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dreambooth.train.speed.adamw8bit import BLOCK, CHUNK, FlatAdamW8bit, dynamic_code  # noqa: E402
from dreambooth.train.speed.flat import FlatParameters  # noqa: E402


def _timed(function, repeats: int = 10) -> float:
    function()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        function()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def _time_ours(elements: int) -> float:
    big = torch.nn.Parameter(torch.zeros(elements // BLOCK * BLOCK, device="cuda", dtype=torch.bfloat16))
    flat = FlatParameters([big])
    optimizer = FlatAdamW8bit(flat, lr=1e-5, compile=True)
    flat.grad.normal_()

    def update() -> None:
        for start in range(0, flat.numel, CHUNK):
            stop = min(start + CHUNK, flat.numel)
            optimizer.update_range(start, stop, flat.grad[start:stop])

    return _timed(update)


def main() -> None:
    """Compare codes, trajectories and speed; print a JSON line."""
    import bitsandbytes.functional as bnbf

    ap = argparse.ArgumentParser()
    ap.add_argument("--elements", type=int, default=859_520_964)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    report: dict = {
        "same_signed_code": bool(torch.equal(dynamic_code(True), bnbf.create_dynamic_map(signed=True).cpu())),
        "same_unsigned_code": bool(torch.equal(dynamic_code(False), bnbf.create_dynamic_map(signed=False).cpu())),
    }
    if not (report["same_signed_code"] and report["same_unsigned_code"]):
        ours, theirs = dynamic_code(True), bnbf.create_dynamic_map(signed=True).cpu()
        report["largest_code_difference"] = float((ours - theirs).abs().max())

    # trajectories: fp32 weights, same gradients every step
    device = torch.device("cuda")
    torch.manual_seed(0)
    n = 4 * 1024 * 1024
    start = torch.randn(n, device=device) * 0.05
    ours_param = torch.nn.Parameter(start.clone())
    flat = FlatParameters([ours_param])
    ours = FlatAdamW8bit(flat, lr=1e-3, compile=True)
    theirs_param = start.clone()
    state1, state2 = torch.zeros(n, dtype=torch.uint8, device=device), torch.zeros(n, dtype=torch.uint8, device=device)
    absmax1, absmax2 = torch.zeros(n // BLOCK, device=device), torch.zeros(n // BLOCK, device=device)
    code1, code2 = bnbf.create_dynamic_map(signed=True).to(device), bnbf.create_dynamic_map(signed=False).to(device)
    for step in range(1, a.steps + 1):
        grad = torch.randn(n, device=device) * torch.logspace(-4, 0, n, device=device)
        flat.grad.copy_(grad)
        ours.step()
        bnbf.optimizer_update_8bit_blockwise("adam", grad.clone(), theirs_param, state1, state2, 0.9, 0.999, 0.0, 0.0,
                                            1e-8, step, 1e-3, code1, code2, absmax1, absmax2, weight_decay=1e-2)
    moved = (theirs_param - start).norm().item()
    report["trajectory_gap_relative_to_movement"] = (flat.data - theirs_param).norm().item() / moved

    # speed of one update of a whole SD 1.5 UNet's worth of bf16 weights, in the in-backward buckets' size
    report["ours_ms_per_update"] = round(_time_ours(a.elements), 2)
    torch.cuda.empty_cache()
    m = a.elements // BLOCK * BLOCK
    p32, g32 = torch.zeros(m, device=device), torch.randn(m, device=device)
    s1, s2 = torch.zeros(m, dtype=torch.uint8, device=device), torch.zeros(m, dtype=torch.uint8, device=device)
    a1, a2 = torch.zeros(m // BLOCK, device=device), torch.zeros(m // BLOCK, device=device)
    report["bitsandbytes_ms_per_update_fp32_weights"] = round(_timed(lambda: bnbf.optimizer_update_8bit_blockwise(
        "adam", g32, p32, s1, s2, 0.9, 0.999, 0.0, 0.0, 1e-8, 1, 1e-5, code1, code2, a1, a2, weight_decay=1e-2)), 2)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
