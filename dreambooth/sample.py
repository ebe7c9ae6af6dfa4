"""Images from the model as it is: preview samples during training, and the pipeline that makes class images."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from .fileio import write_atomic
from .models.components import Components


def inference_pipeline(components: Components):
    """A diffusers text-to-image pipeline over the given components (no safety checker), with a DDIM sampler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=DDIMScheduler.from_config(components.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def render_samples(
    components: Components,
    prompts: list[str],
    negative_prompt: str,
    guidance_scale: float,
    steps: int,
    seed: int,
    resolution: int,
    out_dir: Path,
    step: int,
) -> list[Path]:
    """Render one image per prompt with a fixed seed and write ``out_dir/step_<N>_<i>.png``."""
    pipeline = inference_pipeline(components)
    was_training = components.unet.training, components.text_encoder.training
    components.unet.eval()
    components.text_encoder.eval()
    paths = []
    unet_dtype = next(components.unet.parameters()).dtype
    device = next(components.unet.parameters()).device
    autocast = torch.autocast(device.type, dtype=unet_dtype) if unet_dtype != torch.float32 else nullcontext()
    try:
        for i, prompt in enumerate(prompts):
            with autocast:
                image = pipeline(
                    prompt=prompt,
                    negative_prompt=negative_prompt or None,
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    height=resolution,
                    width=resolution,
                    generator=torch.Generator(device="cpu").manual_seed(seed),
                ).images[0]
            paths.append(
                write_atomic(out_dir / f"step_{step:06d}_{i}.png", lambda tmp, im=image: im.save(tmp, format="PNG"))
            )
    finally:
        components.unet.train(was_training[0])
        components.text_encoder.train(was_training[1])
    return paths
