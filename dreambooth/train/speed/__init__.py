"""Performance utilities for the training loop, each isolated, switchable and testable on its own.

- :mod:`.rounding`  bf16 stochastic rounding (unbiased writes of fp32 results into bf16 storage)
- :mod:`.flat`      every parameter (and its gradient) as a view into one flat buffer
- :mod:`.adamw`     AdamW over a flat buffer: bf16 weights + stochastic rounding, device-side step count
- :mod:`.adamw8bit` the same with bitsandbytes' blockwise 8-bit state (low memory)
- :mod:`.adafactor` transformers' Adafactor over a flat buffer: factored second moments (the least memory)
- :mod:`.backward`  the optimizer step fused into the backward pass, bucket by bucket (no full gradient)
- :mod:`.layout`    channels_last and torch.compile helpers
- :mod:`.scalars`   loss/metric values kept on the device, read back every N steps (no host sync per step)
- :mod:`.float8`    frozen base weights stored in float8, upcast layer by layer (LoRA's ``lora_base_precision: fp8``)
"""
