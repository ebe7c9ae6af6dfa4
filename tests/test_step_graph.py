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


def test_an_optimizer_the_step_graph_cannot_record_leaves_the_step_unrecorded_and_says_so(monkeypatch):
    """The loop's choice of graph reads the optimizer table: a fused step whose optimizer does not record runs as
    usual, with a warning, instead of being recorded (or swapped for another optimizer)."""
    import dataclasses
    from types import SimpleNamespace

    from dreambooth.config import TrainConfig
    from dreambooth.events import Events
    from dreambooth.train import optimizers
    from dreambooth.train.loop import _graph_kind

    seen: list[dict] = []
    unet = SimpleNamespace(is_gradient_checkpointing=False)
    run = SimpleNamespace(config=TrainConfig(optimizer_in_backward=True), device=torch.device("cuda"),
                          autocast_dtype=None, components=SimpleNamespace(unet=unet),
                          events=Events(on_event=seen.append))

    def kind(spec) -> str | None:
        updater = SimpleNamespace(backward_step=object(), spec=spec)
        return _graph_kind(run, False, torch.bfloat16, updater)

    assert kind(optimizers.OPTIMIZERS["adamw_8bit"]) == "step" and not seen
    unrecordable = dataclasses.replace(optimizers.OPTIMIZERS["adamw_8bit"],
                                       paths=optimizers.OPTIMIZERS["adamw_8bit"].paths - {"step_graph"})
    assert kind(unrecordable) is None
    assert [e["event"] for e in seen] == ["warning"] and "adamw_8bit cannot be recorded" in seen[0]["message"]
    assert kind(optimizers.OPTIMIZERS["adafactor"]) is None  # the table's entry: its update runs eagerly
    assert "adafactor cannot be recorded" in seen[-1]["message"]
