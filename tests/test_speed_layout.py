"""Layout helpers: channels_last keeps the function; block-wise compile wraps each repeated block, not the model;
the channels-last group norm computes nn.GroupNorm's result and gradients."""

import pytest
import torch

from dreambooth.models.tiny import TINY_UNET
from dreambooth.train.speed.layout import (
    ChannelsLastGroupNorm,
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
    channels_last_group_norms(swapped)
    return plain, swapped


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_group_norm_gives_group_norms_result_and_gradients(dtype):
    plain, swapped = _norm_pair()
    assert type(swapped) is ChannelsLastGroupNorm and swapped.state_dict().keys() == plain.state_dict().keys()
    plain.to(dtype)
    swapped.to(dtype)
    x = (torch.randn(2, 64, 12, 10) * 3 + 5).to(dtype)  # a mean far from 0: a one-pass variance would lose digits
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    x_plain = x.detach().clone().requires_grad_()
    out, out_plain = swapped(x), plain(x_plain)
    grad = torch.randn_like(out_plain)
    out.backward(grad)
    out_plain.backward(grad)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == dtype
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}
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


def test_group_norm_swap_covers_the_unet_and_undoes():
    unet = _unet()
    norms = [m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert channels_last_group_norms(unet) == len(norms) > 0
    assert {type(m) for m in norms} == {ChannelsLastGroupNorm}
    plain_group_norms(unet)
    assert {type(m) for m in norms} == {torch.nn.GroupNorm}
