"""SDPA's attention kernels on SD 1.5's attention shapes, forward + backward, on the GPU: which backend is fastest
for the UNet's heads (8 heads of 40, 80, 160 dims), and how much of a training step attention takes.

    python bench/attention_micro.py [--rows 32] [--repeat 20]

``--rows``: UNet rows per step (2 x batch with prior preservation). Per SD 1.5 step: at 64x64 latents 5 self- and
5 cross-attentions (4096 queries, 40 dims), at 32x32 and 16x16 5 + 5 each (80 and 160 dims), in the middle block
1 + 1 (8x8, 160 dims); cross-attention reads 77 text tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import timed

# (queries, keys, head dim, calls per step)
SHAPES = [
    (4096, 4096, 40, 5), (4096, 77, 40, 5),
    (1024, 1024, 80, 5), (1024, 77, 80, 5),
    (256, 256, 160, 5), (256, 77, 160, 5),
    (64, 64, 160, 1), (64, 77, 160, 1),
]
BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def _tensor(rows: int, heads: int, length: int, dim: int, layout: str) -> torch.Tensor:
    if layout == "diffusers":
        base = torch.randn(rows, length, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        return base.transpose(1, 2)
    return torch.randn(rows, heads, length, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)


def main() -> None:
    """Time every (shape, backend) and print the per-step totals."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--layout", choices=["contiguous", "diffusers"], default="contiguous",
                    help="diffusers: q, k, v as the views diffusers' AttnProcessor2_0 passes ((B, S, H, D) transposed)")
    a = ap.parse_args()
    rows, heads = a.rows, 8
    results: dict[str, dict] = {name: {"per_shape_ms": [], "step_ms": 0.0} for name in BACKENDS}
    for queries, keys, dim, calls in SHAPES:
        q, k, v = (_tensor(rows, heads, n, dim, a.layout) for n in (queries, keys, keys))
        with sdpa_kernel(list(BACKENDS.values()), set_priority=True):
            chosen = torch._fused_sdp_choice(q, k, v)
        print(f"{queries}x{keys}, d{dim}, {a.layout}: with cuDNN first the dispatcher picks backend {chosen} "
              f"(cudnn = {int(SDPBackend.CUDNN_ATTENTION)})")
        grad = torch.randn(rows, heads, queries, dim, device="cuda", dtype=torch.bfloat16)
        for name, backend in BACKENDS.items():

            def step(backend=backend, q=q, k=k, v=v, grad=grad):
                with sdpa_kernel([backend]):
                    out = F.scaled_dot_product_attention(q, k, v)
                out.backward(grad)

            try:
                timed(step, 3)  # warm-up
                ms = timed(step, a.repeat)
            except RuntimeError as exc:
                ms = float("nan")
                print(f"{name} {queries}x{keys}x{dim}: {str(exc).splitlines()[0][:120]}")
            results[name]["per_shape_ms"].append(ms)
            results[name]["step_ms"] += ms * calls
    print(f"rows {rows}; fwd+bwd ms per call, and per SD 1.5 step (weighted by calls)")
    print("| shape | " + " | ".join(BACKENDS) + " |")
    print("|---|" + "---:|" * len(BACKENDS))
    for i, (queries, keys, dim, calls) in enumerate(SHAPES):
        cells = " | ".join(f"{results[n]['per_shape_ms'][i]:.3f}" for n in BACKENDS)
        print(f"| {queries}x{keys}, d{dim} (x{calls}) | {cells} |")
    print("| **per step** | " + " | ".join(f"**{results[n]['step_ms']:.1f}**" for n in BACKENDS) + " |")
    print(json.dumps({"rows": rows, "torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
                      "results": results}))


if __name__ == "__main__":
    main()
