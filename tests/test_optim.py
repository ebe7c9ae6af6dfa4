"""The AdamW the engine builds: torch's fused kernel where torch has one, the same update as torch's reference loop."""

from __future__ import annotations

import torch

from dreambooth.config import TrainConfig
from dreambooth.train import optim
from dreambooth.train.optim import build_optimizer


def _weights(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((64, 32), (32,), (8, 4, 3, 3))]


def _train(optimizer: torch.optim.Optimizer, weights: list[torch.nn.Parameter], steps: int = 5) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for w in weights:
            w.grad = torch.randn(w.shape, generator=generator)
        optimizer.step()


def test_cpu_adamw_is_fused_and_takes_the_reference_loops_steps():
    config = TrainConfig(learning_rate=1e-2, weight_decay=0.1)
    ours, reference = _weights(0), _weights(0)
    optimizer = build_optimizer(config, [{"params": ours, "lr": config.learning_rate}])
    if torch.__version__ >= (2, 4):
        assert optimizer.defaults["fused"] is True
    else:  # no fused CPU kernel before torch 2.4: the multi-tensor form instead
        assert optimizer.defaults["foreach"] is True
    _train(optimizer, ours)
    _train(torch.optim.AdamW(reference, foreach=False, **optim.adam_arguments(config)), reference)
    moved = sum((w - w0).norm() for w, w0 in zip(reference, _weights(0)))
    assert moved > 0.1
    for w, r in zip(ours, reference):
        torch.testing.assert_close(w, r, rtol=1e-5, atol=1e-6)


def test_without_a_fused_kernel_the_multi_tensor_form_is_taken(monkeypatch):
    real = torch.optim.AdamW

    def no_fused(params, **kwargs):
        if kwargs.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused)
    optimizer = build_optimizer(TrainConfig(), [{"params": _weights(0), "lr": 1e-3}])
    assert optimizer.defaults["foreach"] is True and not optimizer.defaults["fused"]
