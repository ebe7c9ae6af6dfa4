"""How a model's components are used together: the family's diffusers text-to-image pipeline over them (class
images, previews, a diffusers folder written by ``convert``)."""

from __future__ import annotations

from .components import Components
from .families import ModelFamily


def inference_pipeline(family: ModelFamily, components: Components):
    """The family's diffusers text-to-image pipeline over the given components (no safety checker), with a DDIM
    sampler."""
    import diffusers
    from diffusers import DDIMScheduler

    pipeline = getattr(diffusers, family.pipeline_class)(
        **family.pipeline_components(components),
        scheduler=DDIMScheduler.from_config(components.scheduler.config),
        **family.pipeline_extras(),
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
