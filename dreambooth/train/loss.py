"""The DreamBooth objective (Ruiz et al., 2023, eq. 2), one function to check line by line:

    L = E[ w(t) ||x̂(z_t, c) - y||² ]  over instance images
      + λ E[ w(t') ||x̂(z'_t', c_pr) - y'||² ]  over class images (prior preservation)

where y is the noise (epsilon prediction) or the velocity (v prediction), each sample has its own uniformly
drawn timestep, λ is ``prior_loss_weight``, and w is 1 or the min-SNR weight computed from each sample's OWN
timestep (diffusers' example script weights the instance half with the class half's timesteps: not here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Noised:
    """A batch made ready for the denoiser: noisy latents, timesteps and the regression target."""

    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


def add_noise(latents: torch.Tensor, scheduler, generator: torch.Generator, offset_noise: float = 0.0) -> Noised:
    """Draw one uniform timestep and Gaussian noise per sample; build z_t and the target for the scheduler's
    prediction type. ``offset_noise`` adds a per-sample, per-channel constant to the noise."""
    batch, channels = latents.shape[:2]
    noise = torch.randn(latents.shape, generator=generator, device=generator.device, dtype=torch.float32)
    if offset_noise:
        noise = noise + offset_noise * torch.randn(
            (batch, channels, 1, 1), generator=generator, device=generator.device, dtype=torch.float32
        )
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (batch,), generator=generator, device=generator.device
    )
    noise = noise.to(latents.device)
    timesteps = timesteps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        target = noise
    elif prediction == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction type {prediction!r}")
    return Noised(noisy_latents=noisy, timesteps=timesteps, target=target)


def min_snr_weights(
    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Min-SNR-γ weights (Hang et al., 2023), one per sample, from that sample's timestep."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alpha_bar / (1.0 - alpha_bar)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1.0) if prediction_type == "v_prediction" else clipped / snr


@dataclass
class LossParts:
    """The total loss and its two terms (class term is 0 without class samples)."""

    total: torch.Tensor
    instance: torch.Tensor
    prior: torch.Tensor


def dreambooth_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    num_instance: int,
    prior_loss_weight: float,
    weights: torch.Tensor | None = None,
) -> LossParts:
    """Instance MSE + ``prior_loss_weight`` × class MSE.

    The batch holds ``num_instance`` instance samples first, then the class samples; each sample's squared
    error is averaged over its pixels and multiplied by its weight (min-SNR) when ``weights`` is given.
    """
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if weights is not None:
        per_sample = per_sample * weights
    instance = per_sample[:num_instance].mean()
    if per_sample.shape[0] > num_instance:
        prior = per_sample[num_instance:].mean()
        return LossParts(total=instance + prior_loss_weight * prior, instance=instance, prior=prior)
    return LossParts(total=instance, instance=instance, prior=torch.zeros_like(instance))
