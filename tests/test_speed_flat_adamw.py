"""Flat parameter buffer and the flat AdamW: same function, same arithmetic as torch's AdamW."""

import copy

import torch

from dreambooth.train.speed.adamw import FlatAdamW
from dreambooth.train.speed.flat import FlatParameters
from dreambooth.train.speed.layout import to_channels_last


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.GroupNorm(2, 8),
        torch.nn.SiLU(),
        torch.nn.Conv2d(8, 4, 3, padding=1),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 36, 5),
    )


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 6, 6, generator=gen), torch.randn(4, 5, generator=gen)


def test_flat_views_keep_the_model_function_and_its_memory_format():
    model = to_channels_last(_model())
    x, _ = _batch(0)
    before = model(x)
    flat = FlatParameters(model.parameters())
    assert torch.equal(model(x), before)
    conv = model[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert conv.data_ptr() == flat.data[flat.offsets[0] :].data_ptr()
    assert all(off % 256 == 0 for off in flat.offsets)


def test_gradients_accumulate_into_the_flat_buffer():
    model = _model()
    reference = copy.deepcopy(model)
    flat = FlatParameters(model.parameters())
    x, y = _batch(1)
    torch.nn.functional.mse_loss(model(x), y).backward()
    torch.nn.functional.mse_loss(reference(x), y).backward()
    for index, ref in enumerate(reference.parameters()):
        grad = flat.grad[flat.slice_of(index)]
        assert torch.allclose(grad, ref.grad.reshape(-1), atol=1e-7)
    flat.zero_grad()
    assert flat.grad.abs().sum() == 0


def test_fp32_flat_adamw_matches_torch_adamw_with_clipping():
    model = _model()
    reference = copy.deepcopy(model)
    flat = FlatParameters(model.parameters())
    ours = FlatAdamW(flat, lr=1e-2, weight_decay=0.1, max_grad_norm=0.05)
    theirs = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(6):
        x, y = _batch(step)
        torch.nn.functional.mse_loss(model(x), y).backward()
        ours.step()
        torch.nn.functional.mse_loss(reference(x), y).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        theirs.step()
        theirs.zero_grad()
    for mine, ref in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(mine, ref, rtol=1e-5, atol=1e-6)
    assert ours.step_count.item() == 6


def test_bf16_weights_with_stochastic_rounding_track_the_fp32_path():
    torch.manual_seed(0)
    fp32 = torch.nn.Linear(256, 256)
    bf16 = copy.deepcopy(fp32)
    flat32 = FlatParameters(fp32.parameters())
    flat16 = FlatParameters(bf16.parameters(), dtype=torch.bfloat16)
    opt32 = FlatAdamW(flat32, lr=1e-4, weight_decay=0.0)
    opt16 = FlatAdamW(flat16, lr=1e-4, weight_decay=0.0)
    start32, start16 = flat32.data.clone(), flat16.data.float()
    for _ in range(20):
        grad = torch.randn(flat32.numel) * 0.01 + 0.01  # a consistent drift every step
        flat32.grad.copy_(grad)
        flat16.grad.copy_(grad)
        opt32.step()
        opt16.step()
    moved32 = flat32.data - start32
    moved16 = flat16.data.float() - start16
    # Each weight carries rounding noise of up to one bf16 step, but the drift is kept: on average the bf16
    # weights moved as far as the fp32 ones (round-to-nearest would have dropped most of these 1e-4 updates).
    assert abs(moved16.mean() / moved32.mean() - 1) < 0.05
    assert torch.nn.functional.cosine_similarity(moved16, moved32, dim=0) > 0.9
    assert flat16.data.dtype == torch.bfloat16


def test_bf16_state_halves_memory_and_stays_close():
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    flat = FlatParameters(model.parameters())
    opt = FlatAdamW(flat, lr=1e-3, state_dtype=torch.bfloat16)
    flat.grad.normal_()
    opt.step()
    assert opt.exp_avg.dtype == torch.bfloat16 and opt.exp_avg_sq.dtype == torch.bfloat16
    assert opt.exp_avg.float().abs().sum() > 0


def test_a_compiled_update_that_fails_falls_back_to_the_eager_kernel(monkeypatch):
    import warnings as warnings_module

    from dreambooth.train.speed import adamw as adamw_module
    from dreambooth.train.speed.adamw import FlatAdamW
    from dreambooth.train.speed.flat import FlatParameters

    def broken_compile(function, **kwargs):
        def compiled(*args):
            raise RuntimeError("no C++ compiler")

        return compiled

    monkeypatch.setattr(adamw_module.torch, "compile", broken_compile)
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(7, 5))]
    twins = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    compiled_flat, eager_flat = FlatParameters(weights), FlatParameters(twins)
    compiled_opt = FlatAdamW(compiled_flat, lr=0.1, compile=True)
    eager_opt = FlatAdamW(eager_flat, lr=0.1)
    for flat in (compiled_flat, eager_flat):
        flat.grad.copy_(torch.linspace(-1, 1, flat.numel))
    with warnings_module.catch_warnings(record=True) as caught:
        warnings_module.simplefilter("always")
        compiled_opt.step()
    eager_opt.step()
    assert any("compiled adamw_update_ failed" in str(w.message) for w in caught)
    assert torch.equal(compiled_flat.data, eager_flat.data)
