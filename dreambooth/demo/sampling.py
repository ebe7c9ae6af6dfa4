"""Draw pictures from a demo model of any family: DDIM with classifier-free guidance, decoded to bytes for the
evaluator."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 5.0


@torch.no_grad()
def sample_images(components: Any, prompts: list[str], seed: int, steps: int = DEFAULT_STEPS,
                  guidance: float = DEFAULT_GUIDANCE, batch: int = 256,
                  device: torch.device | str = "cpu") -> np.ndarray:
    """One (H, W, 3) uint8 picture per prompt from ``components`` (a :class:`~dreambooth.models.components.Components`
    of any family); picture i starts from the noise of ``seed + i``."""
    out = []
    for first in range(0, len(prompts), batch):
        chunk = prompts[first:first + batch]
        out.append(_sample_chunk(components, chunk, seed + first, steps, guidance, device))
    return np.concatenate(out)


def prompt_conditioning(components: Any, prompts: list[str], size: int, device: torch.device | str) -> Any:
    """The family's conditioning of ``prompts`` followed by as many unconditional rows: the empty prompt's, or zeros
    where the family's pipeline uses zeros for it (SDXL's ``force_zeros_for_empty_prompt``); SDXL's time ids say
    that every picture is a ``size``-pixel square, uncropped."""
    from ..models.conditioning import Conditioning, ImageGeometry
    from ..models.families import family_of

    family = family_of(components)
    tokenizers = [getattr(components, name) for name in family.tokenizer_names]
    zeros = bool(family.pipeline_extras().get("force_zeros_for_empty_prompt"))
    texts = prompts if zeros else prompts + [""]
    ids = [t(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.to(device)
           for t in tokenizers]
    encoded = family.encode_prompts(components, ids)
    n = len(prompts)

    def doubled(part: torch.Tensor | None) -> torch.Tensor | None:
        if part is None:
            return None
        uncond = torch.zeros_like(part[:1]) if zeros else part[-1:]
        return torch.cat([part[:n], uncond.expand(n, *part.shape[1:])])

    geometry = ImageGeometry((size, size), (0, 0), (size, size))
    time_ids = family.time_ids([geometry] * (2 * n), torch.device(device))
    return Conditioning(doubled(encoded.context), pooled=doubled(encoded.pooled), time_ids=time_ids)


def _sample_chunk(components: Any, prompts: list[str], seed: int, steps: int, guidance: float,
                  device: torch.device | str) -> np.ndarray:
    from diffusers import DDIMScheduler

    unet, vae = components.unet, components.vae
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type="epsilon")
    scheduler.set_timesteps(steps)
    size = unet.config.sample_size
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    dtype = next(unet.parameters()).dtype
    conditioning = prompt_conditioning(components, prompts, size * scale, device).to(dtype)
    noise = [torch.randn(4, size, size, generator=torch.Generator().manual_seed(seed + i)) for i in range(len(prompts))]
    latents = torch.stack(noise).to(device, dtype)
    for t in scheduler.timesteps:
        both = unet(torch.cat([latents, latents]), t.to(device), **conditioning.unet_kwargs()).sample
        cond, uncond = both.chunk(2)
        latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    images = vae.decode(latents / vae.config.scaling_factor).sample.float()
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
