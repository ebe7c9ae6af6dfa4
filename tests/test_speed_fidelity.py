"""Fidelity of the fast paths: a tiny SD-shaped UNet trained on the same data and noise with torch's fp32 AdamW,
with the optimizer step fused into the backward pass, and with bf16 weights + stochastic rounding + the flat
AdamW. Stated tolerances: the fused fp32 path matches torch to 1e-4 (relative, weights) and its losses to 1e-3;
the bf16 path's mean loss over the last 4 steps is within 5% of fp32's and its weights moved the same way
(cosine of the weight changes > 0.9)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_model import TINY_UNET

from dreambooth.train.speed.adamw import FlatAdamW
from dreambooth.train.speed.backward import BackwardStep
from dreambooth.train.speed.flat import FlatParameters

STEPS, LR = 12, 3e-3


@pytest.fixture(autouse=True)
def _no_denormals():
    """Random tiny weights make denormal numbers that slow a CPU tenfold. Flushing them is a per-thread setting
    (intra-op worker threads started earlier keep theirs), so the test computes on this thread alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)
    torch.set_num_threads(threads)


def _unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_UNET)


def _batch(step: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(1000 + step)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(7))  # the "dataset": fixed
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, 1000, (4,), generator=gen)
    alpha = torch.linspace(0.99, 0.01, 1000)[t].view(-1, 1, 1, 1)
    noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
    context = torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(8))
    return noisy.to(dtype), t, context.to(dtype), noise


def _train(unet, dtype, step_fn) -> list[float]:
    losses = []
    for step in range(STEPS):
        noisy, t, context, noise = _batch(step, dtype)
        loss = F.mse_loss(unet(noisy, t, context).sample.float(), noise)
        loss.backward()
        step_fn()
        losses.append(loss.item())
    return losses


def _weights(unet) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in unet.parameters()])


def _fp32_reference(start):
    model = copy.deepcopy(start)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-2)

    def step():
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, _train(model, torch.float32, step)


def test_step_fused_into_backward_matches_torch_adamw():
    start = _unet()
    reference, ref_losses = _fp32_reference(start)
    fused = copy.deepcopy(start)
    flat = FlatParameters(fused.parameters(), with_grad_buffer=False)
    stepper = BackwardStep(flat, FlatAdamW(flat, lr=LR, weight_decay=1e-2), bucket_elems=20_000)
    fused_losses = _train(fused, torch.float32, stepper.finish)
    ref_w, fused_w = _weights(reference), _weights(fused)
    assert (fused_w - ref_w).norm() / ref_w.norm() < 1e-4
    assert abs(sum(fused_losses) - sum(ref_losses)) / sum(ref_losses) < 1e-3


def test_bf16_weights_with_stochastic_rounding_learn_what_fp32_learns():
    start = _unet()
    initial = _weights(start)
    reference, ref_losses = _fp32_reference(start)
    bf16 = copy.deepcopy(start)
    flat = FlatParameters(bf16.parameters(), dtype=torch.bfloat16)
    bf16_losses = _train(bf16, torch.bfloat16, FlatAdamW(flat, lr=LR, weight_decay=1e-2).step)
    late_ref, late_bf16 = sum(ref_losses[-4:]) / 4, sum(bf16_losses[-4:]) / 4
    assert late_ref < 0.9 * sum(ref_losses[:3]) / 3  # the tiny model does learn in these steps
    assert abs(late_bf16 - late_ref) / late_ref < 0.05
    ref_w, bf16_w = _weights(reference), _weights(bf16)
    assert F.cosine_similarity(bf16_w - initial, ref_w - initial, dim=0) > 0.9
