"""Turn images into VAE latents and prompts into text embeddings, once where the settings allow.

Latents are cached as the VAE's Gaussian (mean and standard deviation) for each image and each flip, and a
fresh latent is sampled from it every step, exactly as an uncached run samples from the same distribution.
A random crop makes every step's pixels different, so it turns the latent cache off.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageOps

from .images import fit_square, image_digest, load_image, to_tensor


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
        self._distributions: dict[tuple[Path, bool], torch.Tensor] = {}
        self._images: dict[Path, Image.Image] = {}

    def prepare(self, paths: list[Path], flips: tuple[bool, ...], progress: Callable[[int, int], None]) -> None:
        """Encode every image (and its mirror image when ``flips`` has True) once, reading the disk cache first."""
        if not self.use_cache:
            return
        jobs = [(p, f) for p in dict.fromkeys(paths) for f in flips]
        for done, (path, flip) in enumerate(jobs, 1):
            self._distributions[(path, flip)] = self._cached_distribution(path, flip)
            progress(done, len(jobs))

    def sample(
        self, paths: list[Path], flips: list[bool], rng: random.Random, generator: torch.Generator
    ) -> torch.Tensor:
        """One latent per image: mean + std · ε, scaled by the VAE's scaling factor."""
        if self.use_cache:
            dist = torch.stack([self._distributions[(p, f)] for p, f in zip(paths, flips)])
        else:
            dist = torch.cat([self._encode(self._pixels(p, f, rng)) for p, f in zip(paths, flips)])
        mean, std = dist.chunk(2, dim=1)
        eps = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
        return (mean + std * eps.to(mean.device)) * self.scaling

    def _cached_distribution(self, path: Path, flip: bool) -> torch.Tensor:
        file = None
        if self.cache_dir is not None:
            key = f"{image_digest(path)[:24]}_{self.resolution}_{'flip' if flip else 'orig'}_{self.model_id}"
            file = self.cache_dir / f"{key}.safetensors"
            if file.is_file():
                from safetensors.torch import load_file

                return load_file(str(file))["dist"].to(self.device)
        dist = self._encode(self._pixels(path, flip, random.Random(0)))[0]
        if file is not None:
            from safetensors.torch import save_file

            from ..fileio import write_atomic

            write_atomic(file, lambda tmp: save_file({"dist": dist.detach().cpu().contiguous()}, str(tmp)))
        return dist

    def _pixels(self, path: Path, flip: bool, rng: random.Random) -> torch.Tensor:
        if path not in self._images:
            image = load_image(path, self.min_side)
            self._images[path] = (
                fit_square(image, self.resolution, True, rng)
                if self.center_crop
                else _shorter_side_to(image, self.resolution)
            )
        image = self._images[path]
        if not self.center_crop:
            image = fit_square(image, self.resolution, False, rng)
        if flip:
            image = ImageOps.mirror(image)
        return to_tensor(image).unsqueeze(0)

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        self.encodes += 1
        vae_param = next(self.vae.parameters())
        dist = self.vae.encode(pixels.to(vae_param.device, vae_param.dtype)).latent_dist
        return torch.cat([dist.mean, dist.std], dim=1).float().to(self.device)


def _shorter_side_to(image: Image.Image, size: int) -> Image.Image:
    scale = size / min(image.size)
    return image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))), Image.LANCZOS)


class PromptEmbeddings:
    """Text-encoder outputs for prompts; computed once per prompt while the text encoder is frozen and caching is on."""

    def __init__(self, tokenizer, text_encoder, device: torch.device, use_cache: bool) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = device
        self.use_cache = use_cache
        self.encodes = 0
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: list[str], trainable: bool) -> torch.Tensor:
        """Embeddings ``[len(prompts), 77, width]``; with gradients when ``trainable``."""
        if trainable or not self.use_cache:
            with torch.set_grad_enabled(trainable):
                return self._encode(prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            with torch.no_grad():
                for prompt, embedding in zip(missing, self._encode(missing)):
                    self._cache[prompt] = embedding
        return torch.stack([self._cache[p] for p in prompts])

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        self.encodes += 1
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self.device))[0]
