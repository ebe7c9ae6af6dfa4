"""On a GPU: building the flat buffer holds one copy of the weights at a time (they pass through host memory), so
a model whose bf16 weights take most of the card can still be flattened.

Needs CUDA, so CI (CPU only) skips it; it runs on the device machine: ``python -m pytest -q tests/test_cuda_flat.py``.
"""

import pytest
import torch

from dreambooth.train.speed.flat import FlatParameters

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU memory: needs a GPU")


def test_flattening_on_the_gpu_never_holds_two_copies_of_the_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(32)]).to("cuda", torch.bfloat16)
    before = [p.detach().clone().cpu() for p in model.parameters()]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    flat = FlatParameters(model.parameters(), dtype=torch.bfloat16, with_grad_buffer=False)
    assert torch.cuda.max_memory_allocated() - start < 0.2 * weights  # the buffer replaced the weights: not 2x
    assert flat.data.is_cuda and all(p.is_cuda and p.data_ptr() != 0 for p in model.parameters())
    assert all(torch.equal(p.detach().cpu(), b) for p, b in zip(model.parameters(), before))
