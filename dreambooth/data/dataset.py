"""Training examples and the order they are used in.

The order is a pure function of (seed, position): each epoch is a fresh permutation drawn from a seeded
generator, so a resumed run needs only two counters to continue exactly where it stopped.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from ..config import Concept
from .captions import caption_for, expand_prompt
from .images import list_images


@dataclass(frozen=True)
class Example:
    """One training image and the prompt it is trained with."""

    path: Path
    prompt: str


def instance_examples(concept: Concept) -> list[Example]:
    """The concept's photos with their prompts (``[filewords]`` filled from each photo's caption)."""
    return [
        Example(path, expand_prompt(concept.instance_prompt, caption_for(path)))
        for path in list_images(concept.instance_dir, "instance images")
    ]


def class_examples(concept: Concept, paths: list[Path]) -> list[Example]:
    """Class images with the class prompt (``[filewords]`` filled from each image's caption)."""
    return [Example(path, expand_prompt(concept.class_prompt, caption_for(path))) for path in paths]


class DataOrder:
    """Which instance and class examples each micro-batch uses.

    Two endless streams, each a sequence of seeded per-epoch permutations; ``state()`` and ``from_state()``
    are all a resume needs.
    """

    def __init__(
        self, num_instance: int, num_class: int, seed: int, instance_position: int = 0, class_position: int = 0
    ) -> None:
        self.num_instance = num_instance
        self.num_class = num_class
        self.seed = seed
        self.instance_position = instance_position
        self.class_position = class_position
        self._permutations: dict[str, tuple[int, list[int]]] = {}

    def next_batch(self, batch_size: int) -> tuple[list[int], list[int]]:
        """Indices of ``batch_size`` instance examples and, when there are class examples, as many class ones."""
        instance = [self._pick("instance", self.num_instance, self.instance_position + i) for i in range(batch_size)]
        self.instance_position += batch_size
        classes: list[int] = []
        if self.num_class:
            classes = [self._pick("class", self.num_class, self.class_position + i) for i in range(batch_size)]
            self.class_position += batch_size
        return instance, classes

    @property
    def epoch(self) -> int:
        """Completed passes over the instance images."""
        return self.instance_position // max(self.num_instance, 1)

    def state(self) -> dict[str, int]:
        """What a resume snapshot stores."""
        return {"instance_position": self.instance_position, "class_position": self.class_position}

    def _pick(self, stream: str, size: int, position: int) -> int:
        epoch, offset = divmod(position, size)
        return self._permutation(stream, size, epoch)[offset]

    def _permutation(self, stream: str, size: int, epoch: int) -> list[int]:
        cached = self._permutations.get(stream)
        if cached is None or cached[0] != epoch:
            order = list(range(size))
            random.Random(f"{self.seed}:{stream}:{epoch}").shuffle(order)
            cached = self._permutations[stream] = (epoch, order)
        return cached[1]
