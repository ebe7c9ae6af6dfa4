"""train/loss.py against the DreamBooth formula computed by hand on fixed noise and timesteps."""

from __future__ import annotations

import torch

from dreambooth.train.loss import add_noise, dreambooth_loss, min_snr_weights


def _scheduler(prediction_type="epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type=prediction_type,
    )


def _alpha_bar() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _draws(seed, shape):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=g)
    t = torch.randint(0, 1000, (shape[0],), generator=g)
    return noise, t


def test_noised_latents_and_targets_follow_the_forward_process():
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise, t = _draws(7, latents.shape)
    ab = _alpha_bar()[t].view(-1, 1, 1, 1)
    eps = add_noise(latents, _scheduler(), torch.Generator().manual_seed(7))
    assert torch.equal(eps.timesteps, t)
    torch.testing.assert_close(eps.noisy_latents, ab.sqrt() * latents + (1 - ab).sqrt() * noise)
    torch.testing.assert_close(eps.target, noise)
    v = add_noise(latents, _scheduler("v_prediction"), torch.Generator().manual_seed(7))
    torch.testing.assert_close(v.target, ab.sqrt() * noise - (1 - ab).sqrt() * latents)


def test_offset_noise_adds_a_per_channel_constant():
    latents = torch.zeros(2, 4, 8, 8)
    plain = add_noise(latents, _scheduler(), torch.Generator().manual_seed(3))
    offset = add_noise(latents, _scheduler(), torch.Generator().manual_seed(3), offset_noise=0.1)
    g = torch.Generator().manual_seed(3)
    torch.randn(latents.shape, generator=g)
    constant = 0.1 * torch.randn((2, 4, 1, 1), generator=g)
    torch.testing.assert_close(offset.target - plain.target, constant.expand(2, 4, 8, 8))


def test_prior_preservation_loss_equals_the_hand_computation():
    g = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    parts = dreambooth_loss(prediction, target, num_instance=2, prior_loss_weight=0.7)
    by_hand = [((prediction[i] - target[i]) ** 2).mean() for i in range(4)]
    instance = (by_hand[0] + by_hand[1]) / 2
    prior = (by_hand[2] + by_hand[3]) / 2
    torch.testing.assert_close(parts.instance, instance)
    torch.testing.assert_close(parts.prior, prior)
    torch.testing.assert_close(parts.total, instance + 0.7 * prior)
    alone = dreambooth_loss(prediction[:2], target[:2], num_instance=2, prior_loss_weight=0.7)
    torch.testing.assert_close(alone.total, instance)


def test_min_snr_weights_use_each_samples_own_timestep():
    timesteps = torch.tensor([10, 900, 10, 900])  # instance half and class half have different timesteps
    ab = _alpha_bar()
    snr = ab[timesteps] / (1 - ab[timesteps])
    eps_w = min_snr_weights(timesteps, ab, 5.0, "epsilon")
    torch.testing.assert_close(eps_w, torch.clamp(snr, max=5.0) / snr)
    v_w = min_snr_weights(timesteps, ab, 5.0, "v_prediction")
    torch.testing.assert_close(v_w, torch.clamp(snr, max=5.0) / (snr + 1))
    g = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    parts = dreambooth_loss(prediction, target, 2, 1.0, eps_w)
    per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(parts.instance, (per_sample[:2] * eps_w[:2]).mean())
    torch.testing.assert_close(parts.prior, (per_sample[2:] * eps_w[2:]).mean())
    # diffusers' example weights the instance half with the class half's timesteps; ours must not equal that here
    wrong = (per_sample[:2] * torch.flip(eps_w[2:], [0])).mean()
    assert not torch.allclose(parts.instance, wrong)
