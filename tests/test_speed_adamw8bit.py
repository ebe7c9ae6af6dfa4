"""8-bit AdamW (block-wise dynamic quantization, torch operations): the code, the quantizer, the update's
trajectory against fp32 AdamW, resume, and rehearsal (the CUDA-graph warm-up) changing nothing."""

import torch

from dreambooth.train.speed.adamw8bit import (
    BLOCK,
    FlatAdamW8bit,
    dequantize_blocks,
    dynamic_code,
    quantize_blocks,
)
from dreambooth.train.speed.backward import BackwardStep
from dreambooth.train.speed.flat import FlatParameters


def test_the_dynamic_codes_span_six_decades_with_two_significant_digits():
    signed, unsigned = dynamic_code(signed=True), dynamic_code(signed=False)
    for code in (signed, unsigned):
        assert code.numel() == 256 and torch.all(code[1:] > code[:-1])  # sorted, no repeats
        assert code.max() == 1.0 and 0.0 in code
    assert signed.min() < -0.99 and unsigned.min() == 0.0
    # precision grows with magnitude: the top decade is split in 64 (signed) / 128 (unsigned) parts, the next in half
    for low, signed_bound, unsigned_bound in ((0.1, 0.071, 0.036), (0.01, 0.141, 0.071)):
        probe = torch.logspace(torch.log10(torch.tensor(low)).item(), torch.log10(torch.tensor(low * 10)).item(), 999)
        for code, bound in ((signed, signed_bound), (unsigned, unsigned_bound)):
            nearest = code[(code[None, :] - probe[:, None]).abs().argmin(dim=1)]
            assert ((nearest - probe).abs() / probe).max() < bound


def test_quantizing_blocks_keeps_each_value_to_the_nearest_code_of_its_block():
    torch.manual_seed(0)
    values = torch.randn(4 * BLOCK) * torch.logspace(-4, 0, 4).repeat_interleave(BLOCK)  # blocks of unlike scales
    code = dynamic_code(signed=True)
    codes, absmax = quantize_blocks(values, (code[1:] + code[:-1]) / 2)
    assert codes.dtype == torch.uint8 and absmax.shape == (4,)
    assert torch.allclose(absmax, values.view(4, BLOCK).abs().amax(dim=1))
    restored = dequantize_blocks(codes, absmax, code)
    scaled = (values.view(4, BLOCK) / absmax[:, None]).view(-1)
    best = (code[None, :] - scaled[:, None]).abs().min(dim=1).values  # brute-force nearest code
    got = (restored.view(4, BLOCK) / absmax[:, None]).view(-1)
    assert torch.allclose((got - scaled).abs(), best, atol=1e-7)
    big = values.abs() > 0.05 * absmax.repeat_interleave(BLOCK)
    assert ((restored - values).abs()[big] / values.abs()[big]).max() < 0.1


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    target = torch.randn(8 * BLOCK)
    return torch.nn.Parameter(torch.zeros(8 * BLOCK)), target


def test_8bit_adamw_follows_fp32_adamw_closely():
    eight, target = _problem()
    exact = torch.nn.Parameter(eight.detach().clone())
    flat = FlatParameters([eight])
    opt = FlatAdamW8bit(flat, lr=0.05, weight_decay=0.01)
    reference = torch.optim.AdamW([exact], lr=0.05, weight_decay=0.01)
    for _ in range(60):
        flat.grad.copy_(2 * (eight.detach() - target) * torch.linspace(0.01, 1, target.numel()))
        opt.step()
        exact.grad = 2 * (exact.detach() - target) * torch.linspace(0.01, 1, target.numel())
        reference.step()
    drift = (eight.detach() - exact.detach()).norm() / exact.detach().norm()
    assert drift < 0.03, drift
    assert (eight.detach() - target).norm() < 0.5 * target.norm()  # it really optimised
    assert opt.step_count.item() == 60


def test_8bit_adamw_clips_the_whole_gradient_to_max_grad_norm():
    def run(max_grad_norm, prescale: bool):
        weight, target = _problem()
        flat = FlatParameters([weight])
        opt = FlatAdamW8bit(flat, lr=0.05, max_grad_norm=max_grad_norm)
        for _ in range(5):
            grad = 50 * (weight.detach() - target)  # norm far above 1: clipping scales every step
            if prescale:
                grad = grad * torch.clamp(1.0 / (grad.norm() + 1e-6), max=1.0)
            flat.grad.copy_(grad)
            opt.step()
        return flat.data.clone()

    clipped, by_hand, unclipped = run(1.0, False), run(None, True), run(None, False)
    torch.testing.assert_close(clipped, by_hand, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(clipped, unclipped, rtol=1e-3, atol=1e-4)


def test_a_resumed_8bit_optimizer_continues_exactly():
    def run(steps: int, state=None):
        weight, target = _problem()
        flat = FlatParameters([weight])
        opt = FlatAdamW8bit(flat, lr=0.05)
        if state is not None:
            flat.data.copy_(state["weights"])
            opt.load_state_dict(state["opt"])
        for _ in range(steps):
            flat.grad.copy_(weight.detach() - target)
            opt.step()
        return flat, opt

    straight, _ = run(10)
    first, opt = run(5)
    saved = {"weights": first.data.clone(), "opt": {k: v.clone() for k, v in opt.state_dict().items()}}
    resumed, _ = run(5, saved)
    assert torch.equal(straight.data, resumed.data)


def test_rehearsing_runs_the_update_on_copies_and_changes_nothing():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    flat = FlatParameters(model.parameters(), with_grad_buffer=False)
    opt = FlatAdamW8bit(flat, lr=1e-2)
    stepper = BackwardStep(flat, opt, bucket_elems=1024)
    assert len(stepper.buckets) > 1
    weights = flat.data.clone()
    state = {k: v.clone() for k, v in opt.state_dict().items()}
    stepper.rehearsing = True
    model(torch.randn(4, 32)).square().mean().backward()
    stepper.finish()
    assert torch.equal(flat.data, weights)
    assert all(torch.equal(v, state[k]) for k, v in opt.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    stepper.rehearsing = False
    model(torch.randn(4, 32)).square().mean().backward()
    stepper.finish()
    assert not torch.equal(flat.data, weights) and opt.step_count.item() == 1
