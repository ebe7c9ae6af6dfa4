"""A minimal DreamBooth loop built from dreambooth/train/speed, to learn which levers pay before the engine has them.

Usage: python bench/ours_like.py --model DIR --instance DIR --class-dir DIR --timing OUT.json --batch 1 [...]

Same work as the reference: 512 px, prior preservation (batch B instance + B class images per step), epsilon
loss, constant LR, AdamW. Differences are the levers: VAE latents (both flips) and the two prompt embeddings are
computed once and the VAE and text encoder are then freed; bf16 weights with stochastic rounding; the optimizer
is one fused kernel over a flat buffer (or fused into backward, bucket by bucket); channels_last; torch.compile;
no host sync per step (the loss is read every 50 steps).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import StepClock

from dreambooth.train.speed.adamw import FlatAdamW
from dreambooth.train.speed.backward import BackwardStep
from dreambooth.train.speed.flat import FlatParameters
from dreambooth.train.speed.layout import (
    compile_blocks,
    compile_module,
    graph_denoiser,
    to_channels_last,
)
from dreambooth.train.speed.scalars import DeviceScalars


def load_pixels(path: Path, size: int) -> torch.Tensor:
    """Resize the short side to ``size``, centre-crop, scale to [-1, 1]; CHW float."""
    image = Image.open(path).convert("RGB")
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


@torch.no_grad()
def cache_latents(vae, folder: Path, device, size: int = 512, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE posterior for every image and its mirror image (bf16, on the device)."""
    paths = sorted(folder.glob("*.jpg"))
    means, stds = [], []
    for i in range(0, len(paths), batch):
        pixels = torch.stack([load_pixels(p, size) for p in paths[i : i + batch]])
        pixels = torch.cat([pixels, pixels.flip(-1)]).to(device, torch.bfloat16)
        dist = vae.encode(pixels).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def embed(tokenizer, text_encoder, prompt: str, device) -> torch.Tensor:
    """The prompt's last hidden state, as the reference conditions on it."""
    ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(device))[0]


def main() -> None:
    """Run the loop; write the timing JSON."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--instance", type=Path, required=True)
    ap.add_argument("--class-dir", type=Path, required=True)
    ap.add_argument("--timing", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=5e-6)
    ap.add_argument("--optimizer", choices=["adamw", "adamw8bit", "torch-fused"], default="adamw")
    ap.add_argument("--state-dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--weights", choices=["bf16", "fp32-autocast"], default="bf16")
    ap.add_argument("--fused-backward", action="store_true")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--compile", default="off", help="torch.compile mode of the UNet ('default', ...), or 'off'")
    ap.add_argument("--optim-compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--graph", action="store_true", help="CUDA-graph the UNet forward+backward")
    ap.add_argument("--compile-scope", choices=["full", "blocks"], default="full")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--save", type=Path)
    args = ap.parse_args()

    clock = StepClock(args.timing, args.warmup, args.steps)
    clock.mark("process_start", time.time())
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)

    vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae", torch_dtype=torch.bfloat16).to(device)
    mean_i, std_i = cache_latents(vae, args.instance, device)
    mean_c, std_c = cache_latents(vae, args.class_dir, device)
    scaling = vae.config.scaling_factor
    del vae
    tokenizer = CLIPTokenizer.from_pretrained(args.model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(args.model, subfolder="text_encoder", torch_dtype=torch.bfloat16).to(
        device
    )
    emb_i = embed(tokenizer, text_encoder, "a photo of zwx dog", device)
    emb_c = embed(tokenizer, text_encoder, "a photo of dog", device)
    del text_encoder
    torch.cuda.empty_cache()
    clock.mark("cached")
    print(
        f"cached latents + embeddings in {clock.marks['cached'] - clock.marks['process_start']:.1f} s, "
        f"peak {torch.cuda.max_memory_allocated() / 1e9:.2f} GB",
        flush=True,
    )

    weight_dtype = torch.bfloat16 if args.weights == "bf16" else torch.float32
    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet", torch_dtype=weight_dtype).to(device)
    unet.train()
    if args.checkpointing:
        unet.enable_gradient_checkpointing()
    if args.channels_last:
        to_channels_last(unet)
    if args.optimizer == "torch-fused":
        optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-2, fused=True)
        flat = stepper = None
    else:
        flat = FlatParameters(unet.parameters(), dtype=weight_dtype, with_grad_buffer=not args.fused_backward)
        if args.optimizer == "adamw8bit":
            from dreambooth.train.speed.adamw8bit import FlatAdamW8bit

            optimizer = FlatAdamW8bit(flat, lr=args.lr, weight_decay=1e-2, compile=args.optim_compile)
        else:
            state = torch.bfloat16 if args.state_dtype == "bf16" else torch.float32
            optimizer = FlatAdamW(
                flat,
                lr=args.lr,
                weight_decay=1e-2,
                state_dtype=state,
                max_grad_norm=None if args.fused_backward else args.clip,
                compile=args.optim_compile,
            )
        stepper = BackwardStep(flat, optimizer) if args.fused_backward else None
    mode = None if args.compile == "default" else args.compile
    model = unet
    if args.compile != "off" and args.compile_scope == "blocks":
        print(f"compiled {compile_blocks(unet, mode=mode)} blocks", flush=True)
    elif args.compile != "off":
        model = compile_module(unet, mode)

    schedule = DDPMScheduler.from_pretrained(args.model, subfolder="scheduler")
    alphas = schedule.alphas_cumprod.to(device)
    sqrt_a, sqrt_1ma = alphas.sqrt(), (1 - alphas).sqrt()
    b = args.batch
    cond = torch.cat([emb_i.expand(b, -1, -1), emb_c.expand(b, -1, -1)]).to(weight_dtype)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    losses = DeviceScalars()
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=args.weights != "bf16")

    def denoise(x, t, c):
        return model(x, t, c, return_dict=False)[0]

    if args.graph:
        shape = (2 * b, 4, mean_i.shape[-2], mean_i.shape[-1])
        x0 = torch.randn(shape, device=device, dtype=weight_dtype).contiguous(memory_format=memory_format)
        t0 = torch.randint(0, 1000, (2 * b,), device=device)
        started = time.time()
        denoise = graph_denoiser(unet, x0, t0, {"context": cond})
        clock.mark("graph_s", time.time() - started)
        print(f"captured CUDA graphs in {clock.marks['graph_s']:.1f} s", flush=True)

    for step in range(args.warmup + args.steps + 1):
        clock.at_step()
        if step in (1, 2):
            print(f"step {step} starts at {time.time() - clock.marks['process_start']:.1f} s", flush=True)
        pick_i = torch.randint(0, mean_i.shape[0], (b,), device=device)
        pick_c = torch.randint(0, mean_c.shape[0], (b,), device=device)
        mean = torch.cat([mean_i[pick_i], mean_c[pick_c]]).float()
        std = torch.cat([std_i[pick_i], std_c[pick_c]]).float()
        latents = (mean + std * torch.randn_like(mean)) * scaling
        noise = torch.randn_like(latents)
        t = torch.randint(0, alphas.shape[0], (2 * b,), device=device)
        noisy = sqrt_a[t].view(-1, 1, 1, 1) * latents + sqrt_1ma[t].view(-1, 1, 1, 1) * noise
        noisy = noisy.to(weight_dtype).contiguous(memory_format=memory_format)
        with autocast:
            pred = denoise(noisy, t, cond).float()
        loss = F.mse_loss(pred[:b], noise[:b]) + F.mse_loss(pred[b:], noise[b:])
        loss.backward()
        if stepper is not None:
            stepper.finish()
        elif flat is not None:
            optimizer.step()
        else:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), args.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.add(loss)
        if step % 50 == 49:
            last = losses.drain()
    clock.mark("save_start")
    if args.save:
        from safetensors.torch import save_file

        save_file({k: v.detach().to(torch.float16).contiguous() for k, v in unet.state_dict().items()}, str(args.save))
    clock.mark("save_end")
    clock.write(
        runner="ours-like",
        last_losses=last[-5:] if "last" in locals() else [],
        settings={k: str(v) for k, v in vars(args).items()},
    )


if __name__ == "__main__":
    main()
