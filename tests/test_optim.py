"""The AdamW the engine builds: torch's fused kernel where torch has one, the same update as torch's reference loop,
and the kernel choice kept across a resume."""

from __future__ import annotations

import torch

from dreambooth.config import TrainConfig
from dreambooth.train.optim import build_optimizer, load_keeping_kernel
from dreambooth.train.optimizers import adam_arguments


def _weights(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((64, 32), (32,), (8, 4, 3, 3))]


def _train(optimizer: torch.optim.Optimizer, weights: list[torch.nn.Parameter], steps: int = 5) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for w in weights:
            w.grad = torch.randn(w.shape, generator=generator)
        optimizer.step()


def _kernel(optimizer: torch.optim.Optimizer) -> tuple:
    """What each group's step will run: (fused, foreach) as the groups say (the optimizer reads them there)."""
    return tuple((bool(g.get("fused")), bool(g.get("foreach"))) for g in optimizer.param_groups)


def test_cpu_adamw_is_fused_and_steps_as_torchs_per_tensor_loop():
    config = TrainConfig(learning_rate=1e-2, weight_decay=0.1)
    ours, reference = _weights(0), _weights(0)
    optimizer = build_optimizer(config, [{"params": ours, "lr": config.learning_rate}])
    # no fused CPU kernel before torch 2.4: the multi-tensor form there
    assert _kernel(optimizer) == (((True, False),) if torch.__version__ >= (2, 4) else ((False, True),))
    _train(optimizer, ours)
    _train(torch.optim.AdamW(reference, foreach=False, **adam_arguments(config)), reference)
    moved = sum((w - w0).norm() for w, w0 in zip(reference, _weights(0)))
    assert moved > 0.1
    for w, r in zip(ours, reference):
        torch.testing.assert_close(w, r, rtol=1e-5, atol=1e-6)


def test_without_a_fused_kernel_the_multi_tensor_form_is_taken(monkeypatch):
    real = torch.optim.AdamW

    def fused_refused(params, **kwargs):  # as torch 2.1-2.3 on a CPU: the groups are written, then the check raises
        optimizer = real(params, **kwargs)
        if kwargs.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return optimizer

    monkeypatch.setattr(torch.optim, "AdamW", fused_refused)
    groups = [{"params": _weights(0), "lr": 1e-3}, {"params": _weights(1), "lr": 1e-4}]
    optimizer = build_optimizer(TrainConfig(), groups)
    assert _kernel(optimizer) == ((False, True), (False, True))
    _train(optimizer, [p for g in optimizer.param_groups for p in g["params"]])  # the CPU step runs


def test_a_resume_point_from_another_kernel_resumes_on_this_builds_kernel():
    weights = _weights(0)
    old = torch.optim.AdamW(weights, lr=1e-3, foreach=False)  # as saved before the fused kernel was chosen
    _train(old, weights)
    optimizer = build_optimizer(TrainConfig(), [{"params": weights, "lr": 1e-3}])
    chosen = _kernel(optimizer)
    load_keeping_kernel(optimizer, old.state_dict())
    assert _kernel(optimizer) == chosen != _kernel(old)
    assert optimizer.state[weights[0]]["step"] == 5  # the moments came back
