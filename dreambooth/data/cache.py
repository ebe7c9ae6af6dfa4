"""Turn images into VAE latents and prompts into the UNet's conditioning, once where the settings allow.

Latents are cached as the VAE's Gaussian (mean and standard deviation) for each image, each shape it is cropped to
(its aspect-ratio bucket; a class image once for every bucket in use) and each flip, and a fresh latent is sampled
from it every step, exactly as an uncached run samples from the same distribution. A random crop makes every step's
pixels different, so it turns the latent cache off. Each latent comes with the geometry of the crop it was made from
(:class:`~dreambooth.models.conditioning.ImageGeometry`), which SDXL's micro-conditioning reads.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image, ImageOps

from ..models.components import Components
from ..models.conditioning import Conditioning, ImageGeometry
from ..models.families import ModelFamily
from .images import cover_size, crop_to, image_digest, load_image, to_tensor

Size = tuple[int, int]
"""(height, width) in pixels."""


class ImageLatents:
    """VAE latents of training images, sampled per step from cached or freshly encoded distributions."""

    def __init__(
        self,
        vae,
        resolution: int,
        center_crop: bool,
        use_cache: bool,
        cache_dir: Path | None,
        model_id: str,
        device: torch.device,
        min_side: int,
    ) -> None:
        self.vae = vae
        self.resolution = resolution
        self.center_crop = center_crop
        self.use_cache = use_cache and center_crop
        self.cache_dir = cache_dir
        self.model_id = model_id
        self.device = device
        self.min_side = min_side
        self.scaling = vae.config.scaling_factor
        self.encodes = 0
        self._distributions: dict[tuple[Path, Size, bool], tuple[torch.Tensor, ImageGeometry]] = {}
        self._images: dict[tuple[Path, Size], tuple[Image.Image, ImageGeometry, int]] = {}

    def prepare(
        self, images: Sequence[tuple[Path, Size]], flips: tuple[bool, ...], progress: Callable[[int, int], None]
    ) -> None:
        """Encode every image at its shape (and its mirror image when ``flips`` has True) once, reading the disk cache
        first."""
        if not self.use_cache:
            return
        jobs = [(path, size, flip) for path, size in dict.fromkeys(images) for flip in flips]
        for done, job in enumerate(jobs, 1):
            self._distributions[job] = self._cached_distribution(*job)
            progress(done, len(jobs))

    def sample(
        self,
        paths: list[Path],
        flips: list[bool],
        size: Size | None,
        rng: random.Random,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, list[ImageGeometry]]:
        """One latent per image, each cropped to ``size`` (None: the ``resolution`` square): mean + std · ε, scaled by
        the VAE's scaling factor; and the geometry of each."""
        size = size or (self.resolution, self.resolution)
        if self.use_cache:
            cached = [self._distribution(p, size, f) for p, f in zip(paths, flips)]
            dist, geometries = torch.stack([d for d, _ in cached]), [g for _, g in cached]
        else:
            pixels = [self._pixels(p, size, f, rng) for p, f in zip(paths, flips)]
            dist = torch.cat([self._encode(image) for image, _ in pixels])
            geometries = [g for _, g in pixels]
        mean, std = dist.chunk(2, dim=1)
        eps = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
        return (mean + std * eps.to(mean.device)) * self.scaling, geometries

    def _distribution(self, path: Path, size: Size, flip: bool) -> tuple[torch.Tensor, ImageGeometry]:
        """The prepared distribution, or (a shape ``prepare`` was not told of) one made now and kept."""
        key = (path, size, flip)
        if key not in self._distributions:
            self._distributions[key] = self._cached_distribution(path, size, flip)
        return self._distributions[key]

    def _cached_distribution(self, path: Path, size: Size, flip: bool) -> tuple[torch.Tensor, ImageGeometry]:
        file = None
        if self.cache_dir is not None:
            height, width = size  # a square keeps the key it had before buckets: its latents are the same
            shape = str(width) if height == width else f"{width}x{height}"
            key = f"{image_digest(path)[:24]}_{shape}_{'flip' if flip else 'orig'}_{self.model_id}"
            file = self.cache_dir / f"{key}.safetensors"
            if file.is_file():
                from safetensors import safe_open

                with safe_open(str(file), framework="pt") as handle:
                    geometry = (handle.metadata() or {}).get("geometry")
                    if geometry:  # a cache file from before geometries were kept is made again
                        numbers = [int(n) for n in geometry.split(",")]
                        return handle.get_tensor("dist").to(self.device), ImageGeometry.from_time_ids(numbers)
        pixels, geometry = self._pixels(path, size, flip, random.Random(0))
        dist = self._encode(pixels)[0]
        if file is not None:
            from safetensors.torch import save_file

            from ..fileio import write_atomic

            meta = {"geometry": ",".join(map(str, geometry.as_time_ids()))}
            write_atomic(file, lambda tmp: save_file({"dist": dist.detach().cpu().contiguous()}, str(tmp), meta))
        return dist, geometry

    def _pixels(self, path: Path, size: Size, flip: bool, rng: random.Random) -> tuple[torch.Tensor, ImageGeometry]:
        """``path`` scaled to cover ``size`` and cropped to it (the centre, or where ``rng`` says), mirrored when
        ``flip``; and the geometry of that crop in the image as loaded."""
        if (path, size) not in self._images:
            image = load_image(path, self.min_side)
            geometry = ImageGeometry((image.height, image.width), (0, 0), size)
            spare = cover_size(image.width, image.height, size)[0] - size[1]
            if self.center_crop:
                image, corner = crop_to(image, size, True, rng)
                geometry = replace(geometry, crop_top_left=corner)
            else:  # scaled once; each step crops it somewhere else
                image = image.resize(cover_size(image.width, image.height, size), Image.LANCZOS)
            self._images[(path, size)] = image, geometry, spare
        image, geometry, spare = self._images[(path, size)]
        if not self.center_crop:
            image, corner = crop_to(image, size, False, rng)
            geometry = replace(geometry, crop_top_left=corner)
        if flip:  # the mirror image of a crop is the crop at the mirrored place of the mirrored image
            image = ImageOps.mirror(image)
            top, left = geometry.crop_top_left
            geometry = replace(geometry, crop_top_left=(top, spare - left))
        return to_tensor(image).unsqueeze(0), geometry

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE's latent Gaussian, computed in fp32 whatever the VAE's stored precision: SD's and SDXL's VAEs
        overflow fp16 (SDXL's into NaN latents), so a half-precision VAE is widened for the call."""
        self.encodes += 1
        vae_param = next(self.vae.parameters())
        widen = vae_param.dtype == torch.float16
        if widen:
            self.vae.to(torch.float32)
        try:
            dist = self.vae.encode(pixels.to(vae_param.device, next(self.vae.parameters()).dtype)).latent_dist
        finally:
            if widen:
                self.vae.to(torch.float16)
        return torch.cat([dist.mean, dist.std], dim=1).float().to(self.device)


class PromptEmbeddings:
    """The UNet's conditioning for a batch: the family's text conditioning of each prompt (computed once per prompt
    while the text encoders are frozen and caching is on) with each image's micro-conditioning where the family has
    one."""

    def __init__(self, family: ModelFamily, components: Components, device: torch.device, use_cache: bool) -> None:
        self.family = family
        self.components = components
        self.device = device
        self.use_cache = use_cache
        self.encodes = 0
        self._cache: dict[str, Conditioning] = {}

    def __call__(
        self, prompts: list[str], trainable: bool, geometries: list[ImageGeometry] | None = None
    ) -> Conditioning:
        """Conditioning of ``len(prompts)`` rows (``context``: ``[rows, 77, width]``); with gradients when
        ``trainable``. ``geometries`` (one per prompt) give the time ids of families that read them."""
        if trainable or not self.use_cache:
            with torch.set_grad_enabled(trainable):
                text = self._encode(prompts)
        else:
            missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
            if missing:
                with torch.no_grad():
                    for prompt, row in zip(missing, self._encode(missing).rows()):
                        self._cache[prompt] = row
            text = Conditioning.stack([self._cache[p] for p in prompts])
        if geometries is None:
            geometries = [ImageGeometry((0, 0), (0, 0), (0, 0))] * len(prompts)
        return text.with_time_ids(self.family.time_ids(geometries, self.device))

    def _encode(self, prompts: list[str]) -> Conditioning:
        self.encodes += 1
        ids = [
            tokenizer(
                prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            for tokenizer in self.tokenizers
        ]
        return self.family.encode_prompts(self.components, ids)

    @property
    def tokenizers(self) -> list:
        """One tokenizer per text encoder, in the family's order."""
        return [getattr(self.components, name) for name in self.family.tokenizer_names]
