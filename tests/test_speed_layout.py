"""Layout helpers: channels_last keeps the function; block-wise compile wraps each repeated block, not the model;
the channels-last group norm computes nn.GroupNorm's result and gradients."""

import pytest
import torch
from tiny_model import TINY_UNET

from dreambooth.train.speed.layout import (
    ChannelsLastGroupNorm,
    blocks_uncompiled,
    channels_last_group_norms,
    compile_blocks,
    plain_group_norms,
    to_channels_last,
)


def _unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_UNET)


def test_channels_last_keeps_outputs_and_stores_conv_weights_nhwc():
    unet = _unet().eval()
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    with torch.no_grad():
        before = unet(x, t, c).sample
        to_channels_last(unet)
        after = unet(x.contiguous(memory_format=torch.channels_last), t, c).sample
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(before, after, atol=1e-5)


def test_compile_blocks_wraps_the_repeated_blocks_only():
    unet = _unet()
    count = compile_blocks(unet)
    wrapped = [m for m in unet.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert count == len(wrapped) > 0
    assert {type(m).__name__ for m in wrapped} <= {
        "BasicTransformerBlock",
        "ResnetBlock2D",
        "Transformer2DModel",
        "Downsample2D",
        "Upsample2D",
    }
    assert getattr(unet, "_compiled_call_impl", None) is None


def _norm_pair(channels: int = 64, groups: int = 8) -> tuple[torch.nn.GroupNorm, torch.nn.GroupNorm]:
    torch.manual_seed(0)
    plain = torch.nn.GroupNorm(groups, channels)
    torch.nn.init.normal_(plain.weight)
    torch.nn.init.normal_(plain.bias)
    swapped = torch.nn.GroupNorm(groups, channels)
    swapped.load_state_dict(plain.state_dict())
    swapped.__class__ = ChannelsLastGroupNorm
    return plain, swapped


@pytest.mark.parametrize(
    ("dtype", "mean", "atol"),
    [
        (torch.float32, 5.0, 1e-4),
        (torch.bfloat16, 5.0, 0.05),
        # fp32's own spacing at 1000 is 6e-5 (both ways are 1e-4 from fp64); E[x²] - E[x]² would be 5 off
        (torch.float32, 1000.0, 5e-4),
    ],
)
def test_channels_last_group_norm_gives_group_norms_result_and_gradients(dtype, mean, atol, monkeypatch):
    plain, swapped = _norm_pair()
    plain.to(dtype)
    swapped.to(dtype)
    x = (torch.randn(2, 64, 12, 10) * 3 + mean).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    x_plain = x.detach().contiguous().requires_grad_()  # NCHW: torch's CPU kernel for channels-last loses the
    # variance at the large offset (max error 1364 against fp64, measured with torch 2.13), its NCHW one does not
    out_plain = plain(x_plain)
    with monkeypatch.context() as patched:  # its own arithmetic, not torch's group norm
        patched.setattr(torch.nn.functional, "group_norm", lambda *a, **k: pytest.fail("called F.group_norm"))
        out = swapped(x)
    grad = torch.randn_like(out_plain)
    out.backward(grad)
    out_plain.backward(grad)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == dtype
    tol = {"atol": atol, "rtol": 1e-4 if dtype == torch.float32 else 0.02}
    assert torch.allclose(out.float(), out_plain.float(), **tol)
    assert torch.allclose(x.grad.float(), x_plain.grad.float(), **tol)
    summed = {"rtol": 1e-3, "atol": 32 * tol["atol"]}  # sums over 2 × 12 × 10 pixels
    assert torch.allclose(swapped.weight.grad.float(), plain.weight.grad.float(), **summed)
    assert torch.allclose(swapped.bias.grad.float(), plain.bias.grad.float(), rtol=1e-3, atol=1e-3)


def test_channels_last_group_norm_leaves_other_inputs_to_group_norm():
    plain, swapped = _norm_pair()
    x = torch.randn(2, 64, 6, 6)
    assert torch.equal(swapped(x), plain(x))  # NCHW: the very same kernel
    flat = torch.randn(3, 64, 5)
    assert torch.equal(swapped(flat), plain(flat))


def test_compiled_blocks_get_channels_last_norms_previews_and_undo_get_plain_ones():
    unet = _unet()
    compile_blocks(unet)  # wraps only: nothing compiles before a call
    swapped = channels_last_group_norms(unet)
    inside = {id(m) for b in unet.modules() if b._compiled_call_impl is not None for m in b.modules()}
    norms = [m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert swapped and all(id(m) in inside for m in swapped)
    assert {type(m) for m in norms if id(m) in inside} == {ChannelsLastGroupNorm}
    assert type(unet.conv_norm_out) is torch.nn.GroupNorm  # outside every compiled block: would run uncompiled
    with blocks_uncompiled(unet):  # previews: plain blocks, plain norms
        assert {type(m) for m in norms} == {torch.nn.GroupNorm}
    assert {type(m) for m in swapped} == {ChannelsLastGroupNorm}
    assert plain_group_norms(unet) == swapped
    assert {type(m) for m in norms} == {torch.nn.GroupNorm}


def test_the_cpu_keeps_the_unet_nchw_when_channels_last_is_asked_for(make_config, model_dir, events, monkeypatch):
    """torch's channels-last group norm on the CPU loses precision; the CPU gains nothing from the layout."""
    import dreambooth.train.loop as loop
    from dreambooth.engine import run
    from dreambooth.train.speed.layout import uses_channels_last

    assert not uses_channels_last(True, torch.device("cpu"))
    assert uses_channels_last(True, torch.device("cuda")) and not uses_channels_last(False, torch.device("cuda"))
    converted = []
    monkeypatch.setattr(loop, "to_channels_last", lambda module: converted.append(module) or module)
    run(make_config(max_steps=1, channels_last=True, device="cpu"), model_dir, events)
    assert converted == []
