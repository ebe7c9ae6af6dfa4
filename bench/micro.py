# ruff: noqa: B023  (each closure is called only within its own loop iteration)
"""Component timings on the GPU, to see where a step's time goes: the UNet's forward+backward (eager, compiled
block by block, compiled whole) and one optimizer step over all 859.5 M UNet weights (each optimizer variant).

    python bench/micro.py --model /tmp/dreambooth-bench/sd15 [--batches 1 8] [--unet eager blocks full] [--optim]
        [--cudnn-first] [--cudnn-benchmark] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from timing import timed

from dreambooth.train.speed.adamw import FlatAdamW
from dreambooth.train.speed.flat import FlatParameters
from dreambooth.train.speed.layout import (
    channels_last_group_norms,
    compile_blocks,
    graph_denoiser,
    to_channels_last,
)


@contextlib.contextmanager
def cudnn_first(enabled: bool) -> Iterator[None]:
    """While inside, SDPA tries cuDNN's attention kernel first (by default flash comes first, cuDNN last)."""
    if not enabled:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        yield


KERNEL_KINDS = (
    ("attention", ("sdpa", "flash", "fmha", "attention")),
    ("layout conversion", ("nchwtonhwc", "nhwctonchw")),
    ("group norm (compiled)", ("group_norm", "var_mean")),
    ("convolution", ("fprop", "dgrad", "wgrad", "conv")),
    ("matrix product", ("nvjet", "gemm", "cutlass", "scaled_mm", "sm90_xmma")),
    ("compiled (triton)", ("triton",)),
)


def kernel_kind(name: str) -> str:
    """The coarse kind of a GPU kernel, from its name (first match in :data:`KERNEL_KINDS`)."""
    lowered = name.lower()
    for kind, marks in KERNEL_KINDS:
        if any(mark in lowered for mark in marks):
            return kind
    return "other (eager elementwise, reductions)"


def gpu_kernels(prof) -> list:
    """The profile's GPU kernels, costliest first (the CPU side of a launch can carry the same name)."""
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sorted(kernels, key=lambda e: -e.self_device_time_total)


def print_kernel_kinds(prof) -> None:
    """GPU milliseconds and kernel counts per :func:`kernel_kind`."""
    totals: dict[str, list[float]] = {}
    for event in gpu_kernels(prof):
        us = event.self_device_time_total
        entry = totals.setdefault(kernel_kind(event.key), [0.0, 0])
        entry[0] += us / 1e3
        entry[1] += event.count
    whole = sum(ms for ms, _ in totals.values())
    for kind, (ms, count) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
        print(f"  {kind:40s} {ms:8.1f} ms {ms / whole:6.1%} {count:6d} kernels")


def unet_case(
    model_dir: Path,
    batch: int,
    variant: str,
    checkpointing: bool,
    profile: bool = False,
    channels_last: bool = True,
    group_norm: str = "native",
) -> None:
    """Print compile seconds and median fwd+bwd milliseconds of one variant."""
    from diffusers import UNet2DConditionModel

    torch._dynamo.reset()
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", torch_dtype=torch.bfloat16).cuda()
    if channels_last:
        to_channels_last(unet)
    unet.train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    model = unet
    if variant == "blocks":
        compile_blocks(unet)
        if group_norm != "native":  # as the engine does: the compiled blocks' norms only
            channels_last_group_norms(unet)
    elif variant == "full":
        model = torch.compile(unet, dynamic=False)
    n = 2 * batch
    x = torch.randn(n, 4, 64, 64, device="cuda", dtype=torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (n,), device="cuda")
    c = torch.randn(n, 77, 768, device="cuda", dtype=torch.bfloat16)

    if variant == "graphed":
        graphed = graph_denoiser(unet, x, t, {"context": c})

        def model(x, t, c, return_dict=False):
            return (graphed(x, t, c),)

    def step():
        out = model(x, t, c, return_dict=False)[0]
        out.float().square().mean().backward()
        for p in unet.parameters():
            p.grad = None

    torch.cuda.reset_peak_memory_stats()
    first = timed(step, 1) / 1e3
    timed(step, 3)
    ms = timed(step, 15)
    ips = n / ms * 1e3
    peak = torch.cuda.max_memory_allocated() / 1e9
    print(
        f"unet b{batch} {variant}{' ckpt' if checkpointing else ''}{'' if channels_last else ' nchw'}"
        f"{'' if group_norm == 'native' else ' gn-' + group_norm}: "
        f"first call {first:.1f} s, fwd+bwd {ms:.1f} ms, "
        f"{ips:.1f} images/s, MFU {ips * 2.41e12 / 790e12:.1%}, peak {peak:.1f} GB",
        flush=True,
    )
    if profile:
        activities = [torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities) as prof:
            step()
            torch.cuda.synchronize()
        for e in gpu_kernels(prof)[:25]:
            print(f"  kernel {e.self_device_time_total / 1e3:7.2f} ms {e.count:5d}  {e.key[:110]}")
        cuda = torch.autograd.DeviceType.CUDA
        aten = [e for e in prof.key_averages() if e.key.startswith("aten::") and e.device_type != cuda]
        for e in sorted(aten, key=lambda e: -e.self_device_time_total)[:12]:  # kernels each op launched itself
            print(f"  aten-op {e.self_device_time_total / 1e3:7.2f} ms {e.count:5d}  {e.key}")
        print_kernel_kinds(prof)


def optim_cases(model_dir: Path) -> None:
    """Print milliseconds per optimizer step over the UNet's weights, for each optimizer variant."""
    from diffusers import UNet2DConditionModel

    for name in (
        "flat-adamw-compiled",
        "flat-adamw-bf16state-compiled",
        "flat-adamw-eager",
        "torch-fused-fp32",
        "flat-adamw8bit",
    ):
        torch._dynamo.reset()
        dtype = torch.float32 if name == "torch-fused-fp32" else torch.bfloat16
        unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", torch_dtype=dtype).cuda()
        if name == "torch-fused-fp32":
            opt = torch.optim.AdamW(unet.parameters(), lr=5e-6, fused=True)
            for p in unet.parameters():
                p.grad = torch.randn_like(p) * 1e-3

            def step():
                torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
                opt.step()
        elif name == "flat-adamw8bit":
            from dreambooth.train.speed.adamw8bit import FlatAdamW8bit

            flat = FlatParameters(unet.parameters(), dtype=dtype)
            flat.grad.normal_(0, 1e-3)
            opt8 = FlatAdamW8bit(flat, lr=5e-6)
            chunk = 32 * 1024 * 1024

            def step():
                opt8.begin_step()
                for s in range(0, flat.numel, chunk):
                    e = min(s + chunk, flat.numel)
                    opt8.update_range(s, e, flat.grad[s:e])
        else:
            flat = FlatParameters(unet.parameters(), dtype=dtype)
            opt = FlatAdamW(
                flat,
                lr=5e-6,
                max_grad_norm=1.0,
                compile="compiled" in name,
                state_dtype=torch.bfloat16 if "bf16state" in name else torch.float32,
            )
            g = torch.randn(flat.numel, device="cuda", dtype=dtype) * 1e-3

            def step():
                flat.grad.copy_(g)
                opt.step()

        first = timed(step, 1) / 1e3
        ms = timed(step, 10)
        torch.cuda.empty_cache()
        memory = torch.cuda.memory_allocated() / 1e9
        print(f"optimizer {name}: first {first:.1f} s, step {ms:.2f} ms, memory {memory:.1f} GB", flush=True)


def main() -> None:
    """Run the cases asked for."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=Path("/tmp/dreambooth-bench/sd15"))
    ap.add_argument("--batches", type=int, nargs="+", default=[1])
    ap.add_argument("--unet", nargs="*", default=["eager", "graphed"])
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--optim", action="store_true")
    ap.add_argument("--cudnn-first", action="store_true", help="SDPA tries cuDNN's attention first")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--cudnn-benchmark", action="store_true", help="cuDNN times its convolution algorithms first")
    ap.add_argument(
        "--group-norm",
        choices=["native", "channels-last"],
        default="native",
        help="channels-last: the compiled blocks' norms are ChannelsLastGroupNorm (--unet blocks only)",
    )
    ap.add_argument("--profile", action="store_true", help="print the UNet step's costliest GPU kernels and kinds")
    a = ap.parse_args()
    with cudnn_first(a.cudnn_first):
        run_cases(a)


def run_cases(a: argparse.Namespace) -> None:
    """The optimizer and UNet cases of the command line."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = a.cudnn_benchmark
    if a.optim:
        optim_cases(a.model)
    for batch in a.batches:
        for variant in a.unet:
            unet_case(a.model, batch, variant, a.checkpointing, a.profile, a.channels_last, a.group_norm)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
