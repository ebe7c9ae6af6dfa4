"""Draw pictures from the demo model: DDIM with classifier-free guidance, decoded to bytes for the evaluator."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 5.0


@torch.no_grad()
def sample_images(unet: Any, vae: Any, text_encoder: Any, tokenizer: Any, prompts: list[str], seed: int,
                  steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, batch: int = 256,
                  device: torch.device | str = "cpu") -> np.ndarray:
    """One (H, W, 3) uint8 picture per prompt; picture i starts from the noise of ``seed + i``."""
    out = []
    for first in range(0, len(prompts), batch):
        chunk = prompts[first:first + batch]
        out.append(_sample_chunk(unet, vae, text_encoder, tokenizer, chunk, seed + first, steps, guidance, device))
    return np.concatenate(out)


def _sample_chunk(unet: Any, vae: Any, text_encoder: Any, tokenizer: Any, prompts: list[str], seed: int,
                  steps: int, guidance: float, device: torch.device | str) -> np.ndarray:
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type="epsilon")
    scheduler.set_timesteps(steps)
    ids = tokenizer(prompts + [""], padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    dtype = next(unet.parameters()).dtype
    states = text_encoder(ids)[0].to(dtype)
    context = torch.cat([states[:-1], states[-1:].expand(len(prompts), -1, -1)])
    size = unet.config.sample_size
    noise = [torch.randn(4, size, size, generator=torch.Generator().manual_seed(seed + i)) for i in range(len(prompts))]
    latents = torch.stack(noise).to(device, dtype)
    for t in scheduler.timesteps:
        both = unet(torch.cat([latents, latents]), t.to(device), context).sample
        cond, uncond = both.chunk(2)
        latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    images = vae.decode(latents / vae.config.scaling_factor).sample.float()
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
