"""``compile_unet``: the UNet compiled block by block trains as the plain one does, and a compiler that fails
leaves a UNet that trains exactly as usual, with a warning that says why.

The compile here is real (torch.compile's CPU backend, a C++ compiler); its speed is measured on the GPU in bench/.
"""

from __future__ import annotations

import copy

import pytest
import torch

from dreambooth.engine import run
from dreambooth.errors import Cancelled
from dreambooth.events import CANCEL_FILE, Events
from dreambooth.train import loop
from dreambooth.train.loop import _cancel_checks_between_blocks
from dreambooth.train.speed.layout import ChannelsLastGroupNorm


@pytest.fixture
def channels_last_norms(monkeypatch) -> list[bool]:
    """Each call of ChannelsLastGroupNorm (traced or run): whether its input was channels-last."""
    calls: list[bool] = []
    forward = ChannelsLastGroupNorm.forward

    def counting(self, x):
        calls.append(x.is_contiguous(memory_format=torch.channels_last))
        return forward(self, x)

    monkeypatch.setattr(ChannelsLastGroupNorm, "forward", counting)
    return calls


def _train(make_config, model_dir, on_event=None, **options) -> tuple[dict | None, list[float], list[str]]:
    seen: list[dict] = []
    run(make_config(**options), model_dir, Events(on_event=lambda e: (seen.append(e), on_event and on_event(e))))
    started = next((e for e in seen if e["event"] == "started"), None)
    losses = [e["loss"] for e in seen if e["event"] == "step"]
    return started, losses, [e["message"] for e in seen if e["event"] == "warning"]


def _frames_compiled(make_config, folder, **options) -> tuple[int, dict | None, list[float], list[str]]:
    """Train with ``compile_unet`` from an empty dynamo cache; returns how many frames dynamo compiled."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    started, losses, warnings = _train(make_config, folder, compile_unet=True, **options)
    return counters["frames"]["ok"], started, losses, warnings


def test_the_compiled_unet_trains_as_the_plain_one(make_config, tmp_path, channels_last_norms):
    """Channels-last is the default, but the CPU keeps the UNet NCHW, so the compiled blocks keep the plain group
    norms there (ChannelsLastGroupNorm is for channels-last memory, on CUDA)."""
    plain, plain_losses, _ = _train(make_config, tmp_path / "plain")
    assert channels_last_norms == []
    frames, compiled, compiled_losses, warnings = _frames_compiled(make_config, tmp_path / "compiled")
    assert plain["compiled_blocks"] == 0
    assert compiled["compiled_blocks"] > 0, warnings
    assert frames >= compiled["compiled_blocks"] // 2  # really compiled: not wrapped and then run eagerly
    assert compiled["compile_s"] > 0
    assert channels_last_norms == []
    assert len(compiled_losses) == len(plain_losses) == 3
    assert torch.allclose(torch.tensor(compiled_losses), torch.tensor(plain_losses), rtol=1e-3, atol=1e-5)


def test_a_unet_that_cannot_compile_trains_as_usual(make_config, tmp_path, monkeypatch, channels_last_norms):
    def broken_compile(self, *args, **kwargs):
        def fails(*a, **k):
            raise RuntimeError("Compiler: cl is not found.\nmore detail")

        self._compiled_call_impl = fails

    plain, plain_losses, _ = _train(make_config, tmp_path / "plain")
    monkeypatch.setattr(torch.nn.Module, "compile", broken_compile)
    started, losses, warnings = _train(make_config, tmp_path / "broken", compile_unet=True)
    assert started["compiled_blocks"] == 0
    assert any("could not be compiled (RuntimeError: Compiler: cl is not found.)" in w for w in warnings), warnings
    assert losses == plain_losses
    assert channels_last_norms == []  # the plain group norms are back


def test_a_torch_without_module_compile_trains_as_usual(make_config, tmp_path, monkeypatch):
    """torch 2.1 (the web UI's pin) has torch.compile but not ``nn.Module.compile``."""
    plain, plain_losses, _ = _train(make_config, tmp_path / "plain")
    monkeypatch.delattr(torch.nn.Module, "compile")
    started, losses, warnings = _train(make_config, tmp_path / "old", compile_unet=True)
    assert started["compiled_blocks"] == 0
    assert any("compile_unet needs torch 2.2 or later" in w for w in warnings), warnings
    assert losses == plain_losses


def test_previews_and_a_trained_text_encoder_compile_nothing_after_the_first_step(make_config, tmp_path):
    """Compiling happens before step 1, where its time is reported and its failure caught: previews (other
    shapes, no gradients) run the plain blocks, and the warm-up matches training's text-encoder gradients."""
    frames, _, _, _ = _frames_compiled(make_config, tmp_path / "a")
    with_previews, _, _, _ = _frames_compiled(make_config, tmp_path / "b", sample_every=1, train_text_encoder=True)
    assert with_previews == frames > 0


def test_a_cancel_while_the_unet_compiles_stops_at_the_next_block(make_config, tmp_path, monkeypatch):
    full_frames, *_ = _frames_compiled(make_config, tmp_path / "full")
    model_dir = tmp_path / "cancelled"
    real_compile = loop.compile_blocks

    def compile_and_cancel_after_the_first_down_block(unet, *args, **kwargs):
        count = real_compile(unet, *args, **kwargs)
        # the tab's Cancel, pressed while the compiler is busy with the first down block's insides
        unet.down_blocks[0].register_forward_hook(lambda *_: (model_dir / CANCEL_FILE).touch())
        return count

    monkeypatch.setattr(loop, "compile_blocks", compile_and_cancel_after_the_first_down_block)
    seen: list[dict] = []
    frames, *_ = _frames_compiled(make_config, model_dir, on_event=seen.append)
    assert 0 < frames < full_frames  # stopped part-way through the compile
    assert not [e for e in seen if e["event"] in ("step", "started", "warning", "error")]
    assert [(e["cancelled"], e["checkpoints"]) for e in seen if e["event"] == "finished"] == [(True, [])]


def test_the_compile_checks_for_a_cancel_between_blocks_in_backward_too(tiny):
    unet = copy.deepcopy(tiny.components.unet)
    forward_done = False
    handles = _cancel_checks_between_blocks(unet, lambda: forward_done)
    sample = torch.randn(1, unet.config.in_channels, 8, 8, requires_grad=True)
    context = torch.randn(1, 77, unet.config.cross_attention_dim)
    prediction = unet(sample, torch.tensor([10]), context).sample  # no cancel yet: the forward runs through
    forward_done = True
    with pytest.raises(Cancelled):
        torch.autograd.grad(prediction.square().mean(), sample)
    for handle in handles:
        handle.remove()
    prediction = unet(sample, torch.tensor([10]), context).sample  # removed: nothing checks any more
    torch.autograd.grad(prediction.square().mean(), sample)
