"""What the UNet is conditioned on besides the noisy latents and the timestep: one object for every family.

SD 1.x and 2.x read the text encoder's hidden states (``context``); SDXL adds the second encoder's pooled
embedding (``pooled``) and six micro-conditioning numbers per image (``time_ids``: original size, crop top-left,
target size). A family builds it (``families``); the loop, the caches and the recorded CUDA graphs pass it along
without knowing which parts it has.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace

import torch


@dataclass(frozen=True)
class ImageGeometry:
    """How a training image became what the model sees (the square, or its aspect-ratio bucket), in pixels: its size
    before resizing, the top-left corner of the crop in the image resized to cover the crop, and the crop's size."""

    original_size: tuple[int, int]
    """(height, width) of the image as read from disk."""
    crop_top_left: tuple[int, int]
    """(top, left) of the crop in the resized image."""
    target_size: tuple[int, int]
    """(height, width) of the crop: the square, or the image's bucket."""

    def as_time_ids(self) -> list[int]:
        """SDXL's six micro-conditioning numbers, in its order."""
        return [*self.original_size, *self.crop_top_left, *self.target_size]

    @classmethod
    def from_time_ids(cls, numbers: list[int]) -> ImageGeometry:
        """The inverse of :meth:`as_time_ids`."""
        return cls(tuple(numbers[0:2]), tuple(numbers[2:4]), tuple(numbers[4:6]))


@dataclass(frozen=True)
class Conditioning:
    """The UNet's conditioning for a batch, one row per image; parts a family does not use stay None."""

    context: torch.Tensor
    """Text-encoder hidden states, ``[batch, tokens, width]`` (the UNet's cross-attention input)."""
    pooled: torch.Tensor | None = None
    """A pooled text embedding per row (SDXL: the second encoder's projected end-of-text state)."""
    time_ids: torch.Tensor | None = None
    """SDXL's ``[batch, 6]`` micro-conditioning (:meth:`ImageGeometry.as_time_ids`)."""

    def unet_kwargs(self) -> dict:
        """The keyword arguments of diffusers' ``UNet2DConditionModel.forward`` that carry this conditioning."""
        kwargs: dict = {"encoder_hidden_states": self.context}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs

    def to(self, dtype: torch.dtype) -> Conditioning:
        """The same conditioning with its text embeddings in ``dtype`` (time ids stay as they are)."""
        return replace(
            self, context=self.context.to(dtype), pooled=None if self.pooled is None else self.pooled.to(dtype)
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The parts present, by field name (recorded graphs copy their inputs by name)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> Conditioning:
        """The inverse of :meth:`tensors` (other entries of ``tensors`` are ignored)."""
        return cls(**{f.name: tensors[f.name] for f in fields(cls) if f.name in tensors})

    def rows(self) -> list[Conditioning]:
        """One conditioning per row, for caching per prompt."""
        parts = self.tensors()
        return [Conditioning.from_tensors({k: v[i] for k, v in parts.items()}) for i in range(len(self.context))]

    @staticmethod
    def stack(rows: Sequence[Conditioning]) -> Conditioning:
        """The batch of :meth:`rows`-shaped conditionings."""
        names = rows[0].tensors().keys()
        return Conditioning.from_tensors({n: torch.stack([r.tensors()[n] for r in rows]) for n in names})

    def with_time_ids(self, time_ids: torch.Tensor | None) -> Conditioning:
        """The same text conditioning with these per-image micro-conditioning numbers."""
        return replace(self, time_ids=time_ids)
