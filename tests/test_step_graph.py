"""Gradient checkpointing that a CUDA graph can record: no RNG-state stashing, same gradients as without it."""

import inspect

import torch
from tiny_model import TINY_UNET

from dreambooth.train.speed.step_graph import checkpointing_is_graph_safe, enable_checkpointing


def _unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_UNET)


def _grads(unet) -> list[torch.Tensor]:
    torch.manual_seed(1)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, TINY_UNET["cross_attention_dim"])
    unet.zero_grad(set_to_none=True)
    unet(x, t, c).sample.square().mean().backward()
    return [p.grad.clone() for p in unet.parameters()]


def test_checkpointing_without_rng_stash_gives_the_same_gradients_where_diffusers_allows_it():
    plain, checkpointed = _unet().train(), _unet().train()
    assert not checkpointing_is_graph_safe(plain)
    graph_safe = enable_checkpointing(checkpointed)
    accepts = "gradient_checkpointing_func" in inspect.signature(checkpointed.enable_gradient_checkpointing).parameters
    assert graph_safe == accepts == checkpointing_is_graph_safe(checkpointed)  # diffusers < 0.32: stock checkpointing
    assert checkpointed.is_gradient_checkpointing
    for a, b in zip(_grads(plain), _grads(checkpointed)):
        assert torch.allclose(a, b, atol=1e-6)


def test_stock_checkpointing_is_not_called_graph_safe():
    unet = _unet()
    unet.enable_gradient_checkpointing()
    assert unet.is_gradient_checkpointing and not checkpointing_is_graph_safe(unet)
