"""Loss and metric values kept on the device and read back in batches, so a step never waits for the host."""

from __future__ import annotations

import torch


class DeviceScalars:
    """Collect 0-d tensors each step; :meth:`drain` copies them to the host in one transfer every N steps."""

    def __init__(self) -> None:
        self._values: list[torch.Tensor] = []

    def add(self, value: torch.Tensor) -> None:
        """Keep ``value`` (detached) without reading it."""
        self._values.append(value.detach().float().reshape(()))

    def __len__(self) -> int:
        return len(self._values)

    def drain(self) -> list[float]:
        """All kept values as floats (one sync), oldest first; empties the collection."""
        if not self._values:
            return []
        values = torch.stack(self._values).cpu().tolist()
        self._values = []
        return values
