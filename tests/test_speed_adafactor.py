"""Adafactor over a flat buffer: transformers' updates on fp32 weights (every shape kind, channels-last included),
stochastic rounding into bf16 that is unbiased and within one bf16 step of the fp32 result, the update inside the
backward pass equal to the one after it, rehearsal changing nothing, and a bitwise resume."""

from __future__ import annotations

import pytest
import torch
from transformers.optimization import Adafactor

from dreambooth.engine import run
from dreambooth.events import Events
from dreambooth.train.speed.adafactor import FlatAdafactor, memory_view
from dreambooth.train.speed.backward import BackwardStep
from dreambooth.train.speed.flat import FlatParameters

SHAPES = ((64, 32), (32,), (8, 4, 3, 3), (6, 5, 1, 1), (2, 3, 4), (1, 16), ())
LR, DECAY = 1e-2, 0.1


def _weights(seed: int = 0, channels_last: bool = False) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.nn.Parameter(torch.randn(shape, generator=generator) * 0.1) for shape in SHAPES]
    if channels_last:
        for w in weights:
            if w.dim() == 4:
                w.data = w.data.contiguous(memory_format=torch.channels_last)
    return weights


def _gradients(step: int) -> list[torch.Tensor]:
    """Gradients of varied scale: some steps' updates exceed transformers' RMS clip (1.0), some do not."""
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(shape, generator=generator) * 10.0 ** (step % 3 - 2) for shape in SHAPES]


def _transformers_run(steps: int) -> list[torch.nn.Parameter]:
    weights = _weights()
    optimizer = Adafactor(weights, lr=LR, scale_parameter=False, relative_step=False, warmup_init=False,
                          weight_decay=DECAY)
    for step in range(steps):
        for w, g in zip(weights, _gradients(step)):
            w.grad = g
        optimizer.step()
    return weights


def _flat_run(steps: int, weights: list[torch.nn.Parameter], dtype=torch.float32) -> FlatAdafactor:
    flat = FlatParameters(weights, dtype=dtype)
    optimizer = FlatAdafactor(flat, lr=LR, weight_decay=DECAY)
    for step in range(steps):
        for w, g in zip(weights, _gradients(step)):
            w.grad.copy_(g)
        optimizer.step()
    return optimizer


@pytest.mark.parametrize("channels_last", [False, True])
def test_on_fp32_weights_it_takes_transformers_steps(channels_last):
    reference = _transformers_run(6)
    ours = _weights(channels_last=channels_last)
    _flat_run(6, ours)
    moved = sum((r - w0).norm() for r, w0 in zip(reference, _weights()))
    assert moved > 0.1
    for w, r in zip(ours, reference):
        assert w.shape == r.shape
        torch.testing.assert_close(w, r, rtol=1e-5, atol=1e-7)


def test_its_statistics_are_transformers_row_and_column_means():
    reference = _weights()
    optimizer = Adafactor(reference, lr=LR, scale_parameter=False, relative_step=False, warmup_init=False)
    ours = _weights()
    flat_optimizer = _flat_run(3, ours)
    for step in range(3):
        for w, g in zip(reference, _gradients(step)):
            w.grad = g
        optimizer.step()
    linear, bias, conv = reference[0], reference[1], reference[2]
    row, col = flat_optimizer._state_of(flat_optimizer.slots[0])
    torch.testing.assert_close(row.reshape(-1), optimizer.state[linear]["exp_avg_sq_row"], rtol=1e-6, atol=0)
    torch.testing.assert_close(col.reshape(-1), optimizer.state[linear]["exp_avg_sq_col"], rtol=1e-6, atol=0)
    (full,) = flat_optimizer._state_of(flat_optimizer.slots[1])
    torch.testing.assert_close(full, optimizer.state[bias]["exp_avg_sq"], rtol=1e-6, atol=0)
    row, col = flat_optimizer._state_of(flat_optimizer.slots[2])  # a 3x3 kernel: 3 + 3 numbers per (out, in)
    assert row.shape == (8 * 4, 3, 1) and optimizer.state[conv]["exp_avg_sq_row"].shape == (8, 4, 3)
    torch.testing.assert_close(row.reshape(8, 4, 3), optimizer.state[conv]["exp_avg_sq_row"], rtol=1e-6, atol=0)
    assert flat_optimizer.state_bytes == 4 * sum(
        s.numel() for state in optimizer.state.values() for k, s in state.items() if k.startswith("exp_avg_sq"))


def test_a_layout_is_seen_in_memory_order_and_a_transposed_one_refused():
    kernel = torch.randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    a, r, c, d = memory_view(tuple(kernel.shape), kernel.stride())
    assert (a, r, c, d) == (8, 3, 3, 4)
    in_memory = kernel.permute(0, 2, 3, 1)  # (out, kh, kw, in): contiguous
    assert in_memory.is_contiguous() and torch.equal(in_memory.reshape(a, r, c, d),
                                                     kernel.permute(0, 2, 3, 1).contiguous().view(a, r, c, d))
    assert memory_view((8, 4, 3, 3), (36, 9, 3, 1)) == (32, 3, 3, 1)
    assert memory_view((6, 5, 1, 1), (5, 1, 5, 5)) == (30, 1, 1, 1)
    with pytest.raises(ValueError, match="neighbours"):
        memory_view((4, 6), (1, 4))  # a transposed matrix: its rows are not contiguous


def test_bf16_weights_round_stochastically_around_the_fp32_step_without_bias():
    torch.manual_seed(0)
    start = (torch.randn(512, 256) * 0.05).to(torch.bfloat16)
    grad = torch.randn(512, 256)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.nn.Parameter(start.to(dtype))
        flat = FlatParameters([weight], dtype=dtype)
        optimizer = FlatAdafactor(flat, lr=1e-5, weight_decay=DECAY)
        optimizer.begin_step()
        optimizer.update_range(0, flat.numel, grad)
        results[dtype] = weight.detach().float()
    target, got = results[torch.float32], results[torch.bfloat16]
    bits = target.view(torch.int32) & -65536  # the bf16 neighbour towards zero, and the one away from it
    toward, away = bits.view(torch.float32), (bits + 65536).view(torch.float32)
    assert ((got == toward) | (got == away)).all()
    assert (got == toward).any() and (got == away).any()
    step = (target - start.float()).abs().mean()
    assert step < 0.1 * (away - toward).abs().mean()  # the updates are a small fraction of a bf16 step ...
    assert (got - start.float()).abs().mean() > 0.5 * step  # ... and survive
    assert abs((got - target).mean()) < 0.01 * (away - toward).abs().mean()  # unbiased


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 1),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(4, 3, 6, 6, generator=generator), torch.randn(4, 5, generator=generator)


def test_inside_the_backward_pass_it_equals_the_step_after_backward_and_frees_each_gradient():
    fused_model, plain_model = _model(), _model()
    fused_flat = FlatParameters(fused_model.parameters(), with_grad_buffer=False)
    plain_flat = FlatParameters(plain_model.parameters())
    fused_opt, plain_opt = FlatAdafactor(fused_flat, lr=LR, weight_decay=DECAY), FlatAdafactor(plain_flat, lr=LR,
                                                                                               weight_decay=DECAY)
    stepper = BackwardStep(fused_flat, fused_opt)
    assert len(stepper.buckets) == len(fused_flat.params)  # one parameter a bucket
    alive = []
    fused_model[0].weight.register_post_accumulate_grad_hook(lambda p: alive.append(fused_model[4].weight.grad))
    before = plain_flat.data.clone()
    for step in range(4):
        x, y = _batch(step)
        torch.nn.functional.mse_loss(fused_model(x), y).backward()
        stepper.finish()
        torch.nn.functional.mse_loss(plain_model(x), y).backward()
        plain_opt.step()
    assert all(p.grad is None for p in fused_model.parameters())
    assert alive and all(g is None for g in alive)  # the last layer's gradient was gone before the first's arrived
    assert (plain_flat.data - before).abs().max() > 1e-3
    torch.testing.assert_close(fused_flat.data, plain_flat.data, rtol=1e-6, atol=1e-7)
    assert fused_opt.step_count.item() == 4


def test_rehearsal_changes_nothing():
    model = _model()
    flat = FlatParameters(model.parameters(), with_grad_buffer=False)
    optimizer = FlatAdafactor(flat, lr=LR, weight_decay=DECAY)
    stepper = BackwardStep(flat, optimizer)
    weights, state = flat.data.clone(), optimizer.factored_state.clone()
    stepper.rehearsing = True
    x, y = _batch(0)
    torch.nn.functional.mse_loss(model(x), y).backward()
    stepper.finish()
    assert torch.equal(flat.data, weights) and torch.equal(optimizer.factored_state, state)
    assert optimizer.step_count.item() == 0


def _bf16_steps(model, flat, optimizer, steps: range) -> None:
    for step in steps:
        torch.manual_seed(10_000 + step)  # the stochastic rounding's draws, as the loop seeds them
        x, y = _batch(step)
        torch.nn.functional.mse_loss(model(x.to(torch.bfloat16)).float(), y).backward()
        optimizer.step()


def test_a_resumed_run_continues_bit_for_bit():
    straight_model = _model().to(torch.bfloat16)
    straight_flat = FlatParameters(straight_model.parameters(), dtype=torch.bfloat16)
    straight = FlatAdafactor(straight_flat, lr=LR, weight_decay=DECAY)
    _bf16_steps(straight_model, straight_flat, straight, range(3))
    saved_weights = straight_flat.data.clone()
    saved_state = {k: v.clone() for k, v in straight.state_dict().items()}
    _bf16_steps(straight_model, straight_flat, straight, range(3, 6))

    resumed_model = _model().to(torch.bfloat16)
    resumed_flat = FlatParameters(resumed_model.parameters(), dtype=torch.bfloat16)
    resumed_flat.data.copy_(saved_weights)
    resumed = FlatAdafactor(resumed_flat, lr=0.5, weight_decay=DECAY)
    resumed.load_state_dict(saved_state)
    _bf16_steps(resumed_model, resumed_flat, resumed, range(3, 6))
    assert not torch.equal(saved_weights, straight_flat.data)
    assert torch.equal(resumed_flat.data, straight_flat.data)
    assert torch.equal(resumed.factored_state, straight.factored_state)


LOW_MEMORY = {"optimizer": "adafactor", "weights_dtype": "bf16", "optimizer_in_backward": True,
              "gradient_checkpointing": True, "prior_preservation": False, "max_steps": 8, "learning_rate": 3e-3}


def _losses(make_config, folder, **options) -> tuple[list[float], dict]:
    seen: list[dict] = []
    result = run(make_config(**{**LOW_MEMORY, **options}), folder, Events(on_event=seen.append))
    return result.losses, next(e for e in seen if e["event"] == "started")


@pytest.mark.slow  # four short trainings
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_engine_learns_with_adafactor_in_the_backward_pass_on_bf16_weights(make_config, tiny, tiny_sdxl,
                                                                                 family, tmp_path):
    """Each step draws the same timesteps and noise in both runs (seeded by step): the trained run's losses, late in
    the run, are below those the untrained weights give on the same draws."""
    model = {"source_checkpoint": str(tiny_sdxl.path), "model_config_dir": str(tiny_sdxl.config_dir)} \
        if family == "sdxl" else {}
    trained, started = _losses(make_config, tmp_path / "a" / "zwx", **model)
    still, _ = _losses(make_config, tmp_path / "b" / "zwx", **model, learning_rate=0.0)
    assert started["optimizer"] == "FlatAdafactor in backward" and started["weights"] == "bfloat16"
    assert started["gradient_checkpointing"]
    assert trained[0] == pytest.approx(still[0], rel=1e-3)  # the same first draw on the same weights
    late = slice(len(trained) // 2, None)
    assert sum(trained[late]) < 0.9 * sum(still[late])
