"""bf16 stochastic rounding: unbiased, always a neighbour, exact where exact."""

import torch

from dreambooth.train.speed.rounding import copy_stochastic_, stochastic_round_to_bf16


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    down = x.view(torch.int32).bitwise_and(-65536).view(torch.float32)
    up = (down.view(torch.int32) + 65536).view(torch.float32)
    return down, up


def test_result_is_one_of_the_two_neighbouring_bf16_values():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    rounded = stochastic_round_to_bf16(x, torch.Generator().manual_seed(1)).float()
    down, up = _neighbours(x)
    assert torch.all((rounded == down) | (rounded == up))


def test_mean_of_many_roundings_is_the_fp32_value():
    x = torch.full((200_000,), 1.0 + 3.0 * 2.0**-10)  # 3/8 of the way between bf16 1.0 and 1.0078125
    rounded = stochastic_round_to_bf16(x, torch.Generator().manual_seed(2)).float()
    assert abs(rounded.mean().item() - x[0].item()) < 2e-5
    nearest = x.to(torch.bfloat16).float()
    assert abs(nearest.mean().item() - x[0].item()) > 2e-3  # round-to-nearest is biased by the whole offset


def test_values_already_in_bf16_are_kept_exactly():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).float()
    assert torch.equal(stochastic_round_to_bf16(x).float(), x)


def test_small_updates_survive_in_bf16_on_average():
    weights = torch.full((50_000,), 0.03).to(torch.bfloat16)
    start = weights[0].float().item()
    nearest = weights.clone()
    gen = torch.Generator().manual_seed(4)
    for _ in range(100):
        copy_stochastic_(weights, weights.float() - 5e-6, gen)
        nearest.copy_(nearest.float() - 5e-6)
    assert torch.equal(nearest.float(), torch.full((50_000,), start))  # every update lost
    assert abs(weights.float().mean().item() - (start - 100 * 5e-6)) < 2e-6


def test_copy_into_fp32_is_exact():
    target = torch.zeros(100)
    source = torch.randn(100)
    copy_stochastic_(target, source)
    assert torch.equal(target, source)
