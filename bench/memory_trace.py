"""A paper estimate of one low-memory training step's GPU memory, on the CPU, without memory: the full-size UNet
built from fake tensors (``FakeTensorMode``), its weights moved into the flat buffer, the flat optimizer's state,
one forward and backward with the update fused into it (``BackwardStep``), and every storage created counted until
it is freed. Measurements live in ``family_memory.py`` (GPU); this says where the bytes go before a GPU is asked.

Usage: python bench/memory_trace.py --family sdxl --optimizer adafactor [--side 128 --rows 2]
       python bench/memory_trace.py --family sdxl --caching   (before the steps: the fp32 VAE encoding one image
       at side x 8 px beside the fp32 text encoders, as the engine caches latents and prompts)

What it cannot see: cuDNN and cuBLAS workspaces, the caching allocator's rounding, the CUDA context, what
``torch.compile`` fuses away (the update runs uncompiled here), and building the flat buffer on a GPU (it stages
the weights through host memory there; on the fake CPU device it holds two copies, reported as ``setup``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import weakref
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GB = 1e9


class StorageTracker(TorchDispatchMode):
    """Counts the bytes of every storage an operation creates until it is freed; keeps the peak of each phase and,
    for the backward phase, the largest storages alive at its peak."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.current = 0
        self.phase = "setup"
        self.peaks: dict[str, int] = {}
        self.at_backward_peak: list[int] = []

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self.seen:
            return
        size = storage.nbytes()
        self.seen[storage] = size
        self.current += size
        weakref.finalize(storage, self._free, size)
        if self.current > self.peaks.get(self.phase, 0):
            self.peaks[self.phase] = self.current
            if self.phase == "backward":
                self.at_backward_peak = sorted(self.seen.values(), reverse=True)[:12]

    def _free(self, size: int) -> None:
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        return out

    def report(self, name: str) -> None:
        print(f"{name}: {self.current / GB:.3f} GB alive", flush=True)


def main() -> None:
    import diffusers

    import dreambooth.train.speed.adamw8bit as adamw8bit
    from dreambooth.models.families import family_named
    from dreambooth.train.speed.adafactor import FlatAdafactor
    from dreambooth.train.speed.adamw import FlatAdamW
    from dreambooth.train.speed.backward import BackwardStep
    from dreambooth.train.speed.flat import FlatParameters
    from dreambooth.train.speed.step_graph import enable_checkpointing

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sdxl")
    parser.add_argument("--optimizer", choices=("adafactor", "adamw_8bit", "adamw"), default="adafactor")
    parser.add_argument("--side", type=int, default=128, help="latent side (1024 px / 8)")
    parser.add_argument("--rows", type=int, default=2, help="latents a step (batch 1 with prior preservation: 2)")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--caching", action="store_true", help="trace the latent and prompt caching instead")
    args = parser.parse_args()
    if args.caching:
        trace_caching(args.family, args.side * 8)
        return

    codes = {signed: adamw8bit.dynamic_code(signed) for signed in (True, False)}  # .tolist() fails on fake tensors
    adamw8bit.dynamic_code = lambda signed: codes[signed].clone()
    family = family_named(args.family)
    config = json.loads((family.stock_config_folder("epsilon") / "unet" / "config.json").read_text())
    started = time.perf_counter()
    with FakeTensorMode(allow_non_fake_inputs=True):
        torch.set_default_dtype(torch.bfloat16)  # module.to() cannot swap fake parameters
        unet = diffusers.UNet2DConditionModel.from_config(config)
        torch.set_default_dtype(torch.float32)
        unet.train()
        if not args.no_checkpointing:
            enable_checkpointing(unet)
        params = list(unet.parameters())
        tracker = StorageTracker()
        with tracker:
            for p in params:
                tracker.track(p)
            tracker.report("bf16 weights")
            flat = FlatParameters(params, dtype=torch.bfloat16, with_grad_buffer=False)
            optimizer = {"adafactor": FlatAdafactor, "adamw_8bit": adamw8bit.FlatAdamW8bit,
                         "adamw": FlatAdamW}[args.optimizer](flat, lr=1e-5, weight_decay=1e-2)
            step = BackwardStep(flat, optimizer)
            tracker.report("flat weights + optimizer state")
            tracker.phase = "forward"
            sample = torch.randn(args.rows, unet.config.in_channels, args.side, args.side, dtype=torch.bfloat16)
            context = torch.randn(args.rows, 77, unet.config.cross_attention_dim, dtype=torch.bfloat16)
            extra = {}
            if unet.config.addition_embed_type == "text_time":
                pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
                extra["added_cond_kwargs"] = {"text_embeds": torch.randn(args.rows, pooled, dtype=torch.bfloat16),
                                              "time_ids": torch.randn(args.rows, 6, dtype=torch.bfloat16)}
            prediction = unet(sample, torch.randint(0, 1000, (args.rows,)), context, **extra).sample
            loss = torch.nn.functional.mse_loss(prediction.float(), torch.randn(prediction.shape))
            tracker.report("after forward")
            tracker.phase = "backward"
            loss.backward()
            step.finish()
            del prediction, loss
            tracker.report("after backward")
    print("peaks GB:", {phase: round(peak / GB, 3) for phase, peak in tracker.peaks.items()})
    print("largest storages at the backward peak, MB:", [round(s / 1e6, 1) for s in tracker.at_backward_peak])
    print(f"traced in {time.perf_counter() - started:.0f} s")


def trace_caching(family_name: str, pixels: int) -> None:
    """The caching phase: the VAE (fp32) encodes one image beside the fp32 text encoders, which then encode two
    prompts; no gradients."""
    import diffusers
    import transformers

    from dreambooth.models.families import family_named

    family = family_named(family_name)
    folder = family.stock_config_folder(None)
    with FakeTensorMode(allow_non_fake_inputs=True):
        vae = diffusers.AutoencoderKL.from_config(json.loads((folder / "vae" / "config.json").read_text()))
        encoders = [getattr(transformers, family.text_encoder_classes[name])(
            transformers.CLIPTextConfig.from_json_file(str(folder / name / "config.json")))
            for name in family.text_encoder_names]
        tracker = StorageTracker()
        with tracker, torch.no_grad():
            for module in (vae, *encoders):
                for tensor in (*module.parameters(), *module.buffers()):
                    tracker.track(tensor)
            tracker.report("fp32 VAE + text encoders")
            latent = vae.encode(torch.randn(1, 3, pixels, pixels)).latent_dist
            del latent
            tracker.report("after encoding")
            for encoder in encoders:
                encoder(torch.randint(0, 49407, (2, 77)), output_hidden_states=True)
    print("peak GB:", round(tracker.peaks["setup"] / GB, 3))


if __name__ == "__main__":
    main()
