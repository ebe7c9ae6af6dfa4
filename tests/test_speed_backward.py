"""The optimizer step fused into backward gives the same weights as a step after backward, and frees gradients."""

import torch

from dreambooth.train.speed.adamw import FlatAdamW
from dreambooth.train.speed.backward import BackwardStep
from dreambooth.train.speed.flat import FlatParameters


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)
    )


def test_fused_step_matches_the_step_after_backward_and_frees_gradients():
    fused_model, plain_model = _model(), _model()
    fused_flat = FlatParameters(fused_model.parameters(), with_grad_buffer=False)
    plain_flat = FlatParameters(plain_model.parameters())
    fused_opt = FlatAdamW(fused_flat, lr=1e-2)
    plain_opt = FlatAdamW(plain_flat, lr=1e-2)
    stepper = BackwardStep(fused_flat, fused_opt, bucket_elems=600)
    assert len(stepper.buckets) > 1
    seen_grads = []
    for step in range(4):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)
        torch.nn.functional.mse_loss(fused_model(x), y).backward()
        stepper.finish()
        seen_grads.append([p.grad for p in fused_model.parameters()])
        torch.nn.functional.mse_loss(plain_model(x), y).backward()
        plain_opt.step()
    assert all(g is None for grads in seen_grads for g in grads)
    assert torch.allclose(fused_flat.data, plain_flat.data, atol=1e-6)


def test_buckets_with_an_unused_parameter_are_still_updated():
    model = _model()
    unused = torch.nn.Linear(3, 3)
    params = list(model.parameters()) + list(unused.parameters())
    flat = FlatParameters(params, with_grad_buffer=False)
    opt = FlatAdamW(flat, lr=1e-2, weight_decay=0.5)
    stepper = BackwardStep(flat, opt, bucket_elems=10_000)
    before = unused.weight.detach().clone()
    model(torch.randn(2, 16)).sum().backward()
    stepper.finish()
    assert not torch.equal(unused.weight, before)  # weight decay reached the bucket whose grads never came
    assert opt.step_count.item() == 1
