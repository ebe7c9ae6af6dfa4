"""AdamW update time on the CPU for the demo model's trained weights (UNet + text encoder): torch's per-tensor
loop, multi-tensor form and fused kernel. From the repository root:

    PYTHONPATH=. python bench/results/2026-11-25-cpu-demo/adamw_cpu.py
"""

import time

import torch
from safetensors.torch import load_file

weights = load_file("dreambooth/demo/model/shapes-sd1.safetensors")
trained = [torch.nn.Parameter(v.float().clone()) for k, v in weights.items() if "first_stage" not in k]
print(len(trained), sum(p.numel() for p in trained) / 1e6, "M")
for p in trained:
    p.grad = torch.randn_like(p)
for kernel in ({"foreach": False}, {"foreach": True}, {"fused": True}):
    optimizer = torch.optim.AdamW([{"params": trained, "lr": 1e-4}], **kernel)
    for _ in range(3):
        optimizer.step()
    start = time.perf_counter()
    for _ in range(20):
        optimizer.step()
    print(kernel, (time.perf_counter() - start) / 20 * 1000, "ms")
