"""Training examples and the order they are used in.

The order is a pure function of (seed, position): each epoch is a fresh permutation drawn from a seeded
generator, so a resumed run needs only two counters to continue exactly where it stopped. With aspect-ratio
buckets every batch is drawn from one bucket, and which bucket is a pure function of the batch's number too.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Sequence
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
    bucket: tuple[int, int] | None = None
    """(height, width) an instance image is scaled and cropped to (``buckets.py``); None for class images, which
    take the shape of their step's instance images."""


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

    Two endless streams, each a sequence of seeded per-epoch permutations; ``state()`` is all a resume needs.

    With ``buckets`` (one label per instance example: its aspect-ratio bucket) the instance images of a batch share
    one bucket. Each bucket is a stream of its own, and the batches go round in rounds: a round gives every bucket
    as many batches as it takes to show each of its images once (``ceil(images / batch_size)``), in an order shuffled
    from (seed, round). Batch ``k`` (``instance_position // batch_size``) therefore draws from a bucket and a place
    in its stream that are a pure function of ``k``. When one bucket holds every image (all square photos, or
    buckets off) its stream is the plain instance stream: the same order as without buckets.

    Batches keep their size: a bucket whose photos do not fill its last batch of a round tops it up from its own
    stream's next pass (as the plain stream does across epochs), so at batch sizes above 1 a small bucket is seen a
    little more often than its share (a lone portrait at batch size 4 fills a whole batch).
    """

    def __init__(
        self,
        num_instance: int,
        num_class: int,
        seed: int,
        instance_position: int = 0,
        class_position: int = 0,
        *,
        buckets: Sequence[Hashable] | None = None,
    ) -> None:
        self.num_instance = num_instance
        self.num_class = num_class
        self.seed = seed
        self.instance_position = instance_position
        self.class_position = class_position
        self._permutations: dict[str, tuple[int, list[int]]] = {}
        labels = list(buckets) if buckets is not None else [None] * num_instance
        members: dict[Hashable, list[int]] = {}
        for index, label in enumerate(labels):
            members.setdefault(label, []).append(index)
        self._buckets = sorted(members.items(), key=lambda item: repr(item[0]))
        self._round_cache: tuple[tuple[int, ...], list[int]] | None = None

    def next_batch(self, batch_size: int) -> tuple[list[int], list[int]]:
        """Indices of ``batch_size`` instance examples (all of one bucket) and, when there are class examples, as many
        class ones."""
        if len(self._buckets) == 1:  # the plain instance stream
            stream, members, start = "instance", range(self.num_instance), self.instance_position
        else:
            bucket, start = self._place(self.instance_position // batch_size, batch_size)
            label, members = self._buckets[bucket]
            stream = f"instance:{label}"
        instance = [members[self._pick(stream, len(members), start + i)] for i in range(batch_size)]
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

    def _place(self, batch: int, batch_size: int) -> tuple[int, int]:
        """The bucket (its index) batch number ``batch`` draws from, and where in that bucket's stream it starts."""
        shares = [math.ceil(len(members) / batch_size) for _, members in self._buckets]
        number, offset = divmod(batch, sum(shares))
        order = self._round(number, shares)
        bucket = order[offset]
        earlier = number * shares[bucket] + order[:offset].count(bucket)
        return bucket, earlier * batch_size

    def _round(self, number: int, shares: list[int]) -> list[int]:
        """The buckets of round ``number``'s batches, in order: bucket ``i`` ``shares[i]`` times, shuffled."""
        key = (number, *shares)
        if self._round_cache is None or self._round_cache[0] != key:
            order = [bucket for bucket, share in enumerate(shares) for _ in range(share)]
            random.Random(f"{self.seed}:buckets:{number}").shuffle(order)
            self._round_cache = (key, order)
        return self._round_cache[1]

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
