"""Preview images of the model as it trains."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from .fileio import write_atomic
from .models.components import Components
from .models.families import ModelFamily
from .models.pipeline import inference_pipeline


@torch.no_grad()
def render_samples(
    family: ModelFamily,
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
    pipeline = inference_pipeline(family, components)
    models = {"unet": components.unet, **components.text_encoders}
    was_training = {name: model.training for name, model in models.items()}
    for model in models.values():
        model.eval()
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
        for name, model in models.items():
            model.train(was_training[name])
    return paths
