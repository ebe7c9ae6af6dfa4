"""Layout helpers: channels_last keeps the function; block-wise compile wraps each repeated block, not the model."""

import torch

from dreambooth.models.tiny import TINY_UNET
from dreambooth.train.speed.layout import compile_blocks, to_channels_last


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
