"""bf16 stochastic rounding.

A bf16 number is the top 16 bits of an fp32 number. Round-to-nearest drops an update that is smaller than half
a bf16 step (at lr 5e-6 almost every AdamW update of a weight of size ~0.03 is), so bf16 weights stop learning.
Stochastic rounding adds a uniform random integer in [0, 2^16) to the fp32 bit pattern and then clears the low
16 bits: the result is one of the two neighbouring bf16 values, the upper one with probability equal to the
distance from the lower one, so the rounding is unbiased and small updates survive on average.
"""

from __future__ import annotations

import torch

_LOW_BITS = 1 << 16
_HIGH_MASK = -65536  # 0xFFFF0000 as a signed int32


def stochastic_round_to_bf16(source: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``source`` (fp32) rounded stochastically to bf16; same shape and device."""
    source = source.to(torch.float32)
    extra = {} if generator is None else {"generator": generator}  # torch.compile refuses generator=None
    noise = torch.randint(0, _LOW_BITS, source.shape, dtype=torch.int32, device=source.device, **extra)
    bits = source.contiguous().view(torch.int32) + noise
    return bits.bitwise_and_(_HIGH_MASK).view(torch.float32).to(torch.bfloat16)


def copy_stochastic_(target: torch.Tensor, source: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Write fp32 ``source`` into ``target``: stochastically rounded when ``target`` is bf16, plainly otherwise."""
    if target.dtype == torch.bfloat16:
        target.copy_(stochastic_round_to_bf16(source, generator))
    else:
        target.copy_(source)
