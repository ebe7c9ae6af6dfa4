"""Device scalars are read back in one go, in order."""

import torch

from dreambooth.train.speed.scalars import DeviceScalars


def test_drain_returns_values_in_order_and_empties():
    scalars = DeviceScalars()
    for value in (0.5, 1.5, 2.5):
        scalars.add(torch.tensor(value, requires_grad=True) * 2)
    assert len(scalars) == 3
    assert scalars.drain() == [1.0, 3.0, 5.0]
    assert scalars.drain() == []
