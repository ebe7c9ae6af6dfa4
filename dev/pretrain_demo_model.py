"""Pretrain the demo model from nothing on generated shape pictures (run on a GPU; minutes).

Two phases, each bounded by wall-clock seconds so a run fits its slot:
1. the autoencoder (8x downsampling, 4 latent channels) on generic random polygons and shape scenes;
2. the UNet and the text encoder together on freshly drawn captioned scenes, encoded by the frozen
   autoencoder on the fly: epsilon prediction on SD 1.x's noise schedule, 10% empty captions (for
   classifier-free guidance), offset noise (so flat black and white backgrounds are reachable), EMA weights.
Then it samples 100 pictures per prompt family, scores them with :mod:`dreambooth.demo.evaluate` and writes the three
components as diffusers-named fp16 safetensors plus their configs; ``--export`` on any machine turns those into
the shipped single file (original layout) and config folder.

``--family sdxl`` pretrains the SDXL-shaped demo model the same way: the UNet gets SDXL's added conditioning
(``text_time``: the second encoder's pooled embedding and six size numbers) and reads two text encoders'
penultimate layers side by side; the autoencoder and the first text encoder are the shipped SD 1.x demo model's,
frozen (``--base``); 10% of the captions are dropped to zeros, as SDXL's pipeline leaves an empty negative prompt
(``force_zeros_for_empty_prompt``).

    python dev/pretrain_demo_model.py train --out OUT [--vae-seconds 90 --unet-seconds 300]
    python dev/pretrain_demo_model.py train --family sdxl --out OUT [--unet-seconds 300]
    python dev/pretrain_demo_model.py export OUT dreambooth/demo/model
    python dev/pretrain_demo_model.py unpack dreambooth/demo/model OUT   # the shipped model as a run to continue
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: the package beside it

from dreambooth.demo import shapes  # noqa: E402

UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [64, 128, 128],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [32, 64, 64, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "sample_size": 64,
}
TEXT_ENCODER = {
    "vocab_size": 49408,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 64,
}
SDXL_UNET = {
    **UNET,
    "cross_attention_dim": 64 + 96,  # the two encoders' hidden states side by side
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 16,
    "projection_class_embeddings_input_dim": 64 + 6 * 16,  # pooled embedding + six embedded size numbers
}
SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
TEXT_ENCODER_2 = {**TEXT_ENCODER, "hidden_size": 96, "intermediate_size": 384, "hidden_act": "gelu"}
"""OpenCLIP's activation; wider than the first encoder, as SDXL's (1280 against 768): diffusers' single-file
loader tells the two apart by width."""
DDPM = {k: v for k, v in SCHEDULER.items() if k != "set_alpha_to_one"}
"""The training noise schedule (DDPM takes no ``set_alpha_to_one``)."""
SDXL_SIZE = 64
"""Every pretraining picture is a 64 px square, uncropped: SDXL's time ids are (64, 64, 0, 0, 64, 64)."""
OFFSET_NOISE = 0.1
CAPTION_DROPOUT = 0.1
RARE_WORD_RATE = 0.3  # share of captions that get 1-3 random tokens at a random word boundary
FIRST_WORD_TOKEN = 256  # ids below are single bytes


def build_components(seed: int = 0) -> tuple[Any, Any, Any]:
    """Fresh (randomly initialised) UNet, autoencoder and text encoder of the demo model's shape."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return (UNet2DConditionModel(**UNET), AutoencoderKL(**VAE), CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER)))


def build_sdxl_components(base: Any, tokenizer_dir: Path, seed: int = 0, warm: bool = False) -> Any:
    """SDXL-shaped components around ``base`` (the SD 1.x demo model's loaded components): a fresh UNet with
    ``text_time`` conditioning (with ``warm``, started from ``base``'s: :func:`warm_start`) and a fresh second text
    encoder (with projection); the autoencoder and the first text encoder are ``base``'s."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from dreambooth.models.components import Components
    from dreambooth.models.tokenizer import load_clip_tokenizer

    torch.manual_seed(seed)
    second = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2))
    unet = UNet2DConditionModel(**SDXL_UNET)
    if warm:
        warm_start(unet, base.unet)
    return Components(unet=unet, vae=base.vae, text_encoder=base.text_encoder,
                      tokenizer=load_clip_tokenizer(tokenizer_dir), scheduler=DDPMScheduler(**DDPM),
                      text_encoder_2=second, tokenizer_2=load_clip_tokenizer(tokenizer_dir, "!"))


def warm_start(unet: Any, sd1_unet: Any) -> list[str]:
    """Start the SDXL-shaped UNet from the SD 1.x demo model's (same blocks): every tensor of the same shape is
    copied, 1x1 convolutions become the linear projections they equal, and the cross-attention keys and values take
    the SD 1.x weights for the first encoder's 64 features and zeros for the second's (so the second encoder starts
    with no say and gains it as it learns). SDXL's added conditioning (``add_embedding``) starts random with its
    output layer at zero, so the UNet starts as the SD 1.x one. Returns the names of the tensors that did not come
    from the SD 1.x UNet."""
    source = sd1_unet.state_dict()
    state = unet.state_dict()
    fresh = []
    for name, tensor in state.items():
        old = source.get(name)
        if old is None:
            fresh.append(name)
        elif old.shape == tensor.shape:
            tensor.copy_(old)
        elif old.dim() == 4 and old.shape[2:] == (1, 1) and old.shape[:2] == tensor.shape:
            tensor.copy_(old[:, :, 0, 0])
        elif tensor.dim() == 2 and old.shape[0] == tensor.shape[0] and old.shape[1] < tensor.shape[1]:
            tensor.zero_()
            tensor[:, :old.shape[1]] = old
        else:
            fresh.append(name)
        if name.startswith("add_embedding.linear_2."):
            tensor.zero_()
    return fresh


def sdxl_conditioning(components: Any, ids: torch.Tensor, end_token: int) -> Any:
    """SDXL's conditioning of caption ids (the first tokenizer's: padded with end-of-text): the second encoder gets
    the same ids padded with '!' as its tokenizer pads; empty captions become zeros (context and pooled)."""
    from dreambooth.models.conditioning import Conditioning
    from dreambooth.models.families import family_named

    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    first_end = torch.where(ids == end_token, positions, ids.shape[1]).amin(1, keepdim=True)
    ids_2 = torch.where(positions > first_end, components.tokenizer_2.pad_token_id, ids)
    encoded = family_named("sdxl").encode_prompts(components, [ids, ids_2])
    keep = (ids[:, 1] != end_token).to(encoded.context.dtype)  # an empty caption: start, end, padding
    size = torch.tensor([[SDXL_SIZE, SDXL_SIZE, 0, 0, SDXL_SIZE, SDXL_SIZE]], dtype=torch.float32, device=ids.device)
    return Conditioning(encoded.context * keep[:, None, None], pooled=encoded.pooled * keep[:, None],
                        time_ids=size.expand(len(ids), 6))


def train_vae(vae: Any, seconds: float, batch: int, device: torch.device, generator: torch.Generator) -> dict:
    """Autoencoder phase: L1 + L2 reconstruction, a whisper of KL; half random polygons, half shape scenes."""
    vae.to(device).train()
    outlines = shapes.polygon_outlines(20000, generator)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    start, step, log = time.time(), 0, []
    while time.time() - start < seconds:
        lr = 1e-3 * min(1.0, (step + 1) / 200)
        for group in optimizer.param_groups:
            group["lr"] = lr
        half = batch // 2
        images = torch.cat([
            shapes.random_polygons(half, generator, outlines, device=device),
            shapes.render(shapes.sample_scenes(batch - half, generator), device=device),
        ]) * 2 - 1
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            posterior = vae.encode(images).latent_dist
            recon = vae.decode(posterior.sample()).sample.float()
        kl = posterior.kl().mean() / (images[0].numel())
        loss = F.mse_loss(recon, images) + F.l1_loss(recon, images) + 1e-4 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 200 == 0:
            log.append({"step": step, "loss": round(loss.item(), 5), "s": round(time.time() - start, 1)})
            print("vae", log[-1], flush=True)
    vae.eval().requires_grad_(False)
    return {"vae_steps": step, "vae_loss": loss.item()}


@torch.no_grad()
def latent_scale(vae: Any, device: torch.device, generator: torch.Generator) -> float:
    """1 / std of the latents of 4096 scenes: the ``scaling_factor`` that makes latents unit-variance."""
    values = []
    for _ in range(8):
        images = shapes.render(shapes.sample_scenes(512, generator), device=device) * 2 - 1
        values.append(vae.encode(images).latent_dist.sample().float())
    return 1.0 / torch.cat(values).std().item()


class SceneLatents:
    """A fixed pool of encoded scenes (latent mean and std) with their attributes, on the training device.

    Captions are drawn afresh for every use, so one scene is seen under several of its captions; the token ids
    of every (template, colour, shape, background) combination are tokenised once into a lookup table.
    ``RARE_WORD_RATE`` of the captions get random tokens inserted ("a red qu√k circle"), so the model meets
    words it does not know, learns that they do not change the picture, and gives them embeddings of the same
    kind as known words: the situation of a real base model meeting a DreamBooth instance word. The tokens of
    ``shapes.INSTANCE_WORD`` are never drawn.
    """

    def __init__(self, vae: Any, tokenizer: Any, count: int, device: torch.device, generator: torch.Generator,
                 chunk: int = 1024) -> None:
        means, stds, attributes = [], [], []
        for first in range(0, count, chunk):
            scenes = shapes.sample_scenes(min(chunk, count - first), generator)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                posterior = vae.encode(shapes.render(scenes, device=device) * 2 - 1).latent_dist
            means.append(posterior.mean.float())
            stds.append(posterior.std.float())
            attributes.append(torch.tensor([[shapes.BASE_COLOURS.index(c), shapes.BASE_SHAPES.index(k),
                                             shapes.BASE_COLOURS.index(b)]
                                            for c, k, b in zip(scenes.colour, scenes.shape, scenes.background)]))
        self.mean, self.std = torch.cat(means), torch.cat(stds)
        self.attributes = torch.cat(attributes).to(device)
        self.device = device
        captions = [template.format(colour=c, shape=k, background=b)
                    for template, _ in shapes.CAPTION_TEMPLATES
                    for c in shapes.BASE_COLOURS for k in shapes.BASE_SHAPES for b in shapes.BASE_COLOURS] + [""]
        self.table = tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids.to(device)
        self.template_weights = torch.tensor([w for _, w in shapes.CAPTION_TEMPLATES], device=device)
        self.end_token = tokenizer.eos_token_id
        vocabulary = torch.arange(FIRST_WORD_TOKEN, tokenizer.eos_token_id - 1)
        reserved = torch.tensor(tokenizer(shapes.INSTANCE_WORD, add_special_tokens=False).input_ids)
        self.rare_tokens = vocabulary[~torch.isin(vocabulary, reserved)].to(device)

    def batch(self, size: int, scale: float, dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled latents (sampled from each posterior) and caption token ids of ``size`` random pool entries."""
        index = torch.randint(len(self.mean), (size,), device=self.device)
        latents = (self.mean[index] + self.std[index] * torch.randn_like(self.mean[index])) * scale
        c, k, b = self.attributes[index].unbind(1)
        n = len(shapes.BASE_COLOURS)
        template = torch.multinomial(self.template_weights, size, replacement=True)
        row = ((template * n + c) * len(shapes.BASE_SHAPES) + k) * n + b
        row = torch.where(torch.rand(size, device=self.device) < dropout, len(self.table) - 1, row)
        ids = self.table[row]
        for _ in range(3):  # up to three random tokens, each at a random place among the caption's words
            chosen = (torch.rand(size, device=self.device) < RARE_WORD_RATE) & (row != len(self.table) - 1)
            ids = insert_tokens(ids, self.rare_tokens, chosen, self.end_token)
        return latents, ids


def insert_tokens(ids: torch.Tensor, vocabulary: torch.Tensor, chosen: torch.Tensor, end_token: int) -> torch.Tensor:
    """Insert one token drawn from ``vocabulary`` into each ``chosen`` row of ``ids`` (B, L), after the start token
    and at or before the first end token; the row's last position falls off (it is padding)."""
    size, length = ids.shape
    positions = torch.arange(length, device=ids.device).expand(size, length)
    first_end = torch.where(ids == end_token, positions, length - 1).amin(1)
    at = 1 + (torch.rand(size, device=ids.device) * first_end.clamp(min=1)).long()
    token = vocabulary[torch.randint(len(vocabulary), (size,), device=ids.device)]
    shifted = torch.gather(ids, 1, (positions - (positions > at[:, None]).long()))
    inserted = torch.where(positions == at[:, None], token[:, None], shifted)
    return torch.where(chosen[:, None], inserted, ids)


def train_unet(components: Any, pool: SceneLatents, scale: float, seconds: float, batch: int, lr: float,
               text_lr: float, device: torch.device) -> dict:
    """Text-to-image phase; puts the EMA copies of what it trained into ``components``. SD 1.x trains the UNet and
    the text encoder; SDXL the UNet and the second text encoder."""
    from diffusers import DDPMScheduler

    from dreambooth.models.conditioning import Conditioning

    sdxl = components.text_encoder_2 is not None
    scheduler = DDPMScheduler(**DDPM)
    alphas = scheduler.alphas_cumprod.to(device)
    text_name = "text_encoder_2" if sdxl else "text_encoder"
    for model in components.models.values():
        model.to(device).eval().requires_grad_(False)
    trained = {"unet": components.unet, text_name: getattr(components, text_name)}
    for model in trained.values():
        model.train().requires_grad_(True)
    ema = {name: copy.deepcopy(model).eval() for name, model in trained.items()}
    live_params = [p for model in trained.values() for p in model.parameters() if p.requires_grad]
    ema_params = [p for name, model in trained.items()
                  for p, q in zip(ema[name].parameters(), model.parameters()) if q.requires_grad]
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": rate, "peak": rate}
              for model, rate in ((trained["unet"], lr), (trained[text_name], text_lr))]
    optimizer = torch.optim.AdamW(groups, weight_decay=1e-2)

    def encode(ids: torch.Tensor) -> Conditioning:
        if sdxl:
            return sdxl_conditioning(components, ids, pool.end_token)
        return Conditioning(components.text_encoder(ids)[0])

    start, step, log = time.time(), 0, []
    warmup = 500
    while (elapsed := time.time() - start) < seconds:
        progress = min(1.0, elapsed / seconds)
        factor = min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = group["peak"] * factor
        latents, ids = pool.batch(batch, scale, CAPTION_DROPOUT)
        noise = torch.randn_like(latents) + OFFSET_NOISE * torch.randn(batch, 4, 1, 1, device=device)
        t = torch.randint(0, 1000, (batch,), device=device)
        a = alphas[t][:, None, None, None]
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            prediction = components.unet(noisy, t, **encode(ids).unet_kwargs()).sample.float()
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(live_params, 1.0)
        optimizer.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, live_params, 1 - decay)
        step += 1
        if step % 1000 == 0:
            log.append({"step": step, "loss": round(loss.item(), 5), "lr": round(lr * factor, 7),
                        "s": round(time.time() - start, 1)})
            print("unet", log[-1], flush=True)
    for name, model in ema.items():
        setattr(components, name, model.eval().requires_grad_(False))
    return {"unet_steps": step, "unet_loss": loss.item()}


def prompt_families() -> dict[str, list[tuple[str, dict[str, str]]]]:
    """Prompts to test the base model on, with what each one asks for (the evaluator's field names)."""
    full, colour_shape, shape_only, background_only = [], [], [], []
    for shape in shapes.BASE_SHAPES:
        shape_only.append((f"a {shape}", {"shape": shape}))
        for colour in shapes.BASE_COLOURS:
            colour_shape.append((f"a {colour} {shape}", {"shape": shape, "colour": colour}))
            for background in shapes.BASE_COLOURS:
                if background != colour:
                    full.append((shapes.full_caption(colour, shape, background),
                                 {"shape": shape, "colour": colour, "background": background}))
    for background in shapes.BASE_COLOURS:
        background_only.append((f"a shape on a {background} background", {"background": background}))
    return {"colour shape on background": full, "colour shape": colour_shape, "shape": shape_only,
            "shape on background": background_only}


def main(argv: list[str] | None = None) -> None:
    """Command line: ``train`` on a GPU, ``export`` anywhere."""
    parser = argparse.ArgumentParser(prog="python dev/pretrain_demo_model.py")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train")
    train.add_argument("--out", type=Path, required=True)
    train.add_argument("--family", choices=["sd1", "sdxl"], default="sd1")
    train.add_argument("--base", type=Path, default=SHIPPED, help="sdxl: the SD 1.x demo model folder it builds on")
    train.add_argument("--warm-start", action="store_true",
                       help="sdxl: start the UNet from the SD 1.x demo model's")
    train.add_argument("--vae-seconds", type=float, default=90)
    train.add_argument("--unet-seconds", type=float, default=300)
    train.add_argument("--vae-batch", type=int, default=128)
    train.add_argument("--batch", type=int, default=512)
    train.add_argument("--lr", type=float, default=5e-4)
    train.add_argument("--text-lr", type=float, default=1e-3)
    train.add_argument("--pool", type=int, default=200_000)
    train.add_argument("--vae-from", type=Path, default=None, help="reuse this run's autoencoder")
    train.add_argument("--init-from", type=Path, default=None, help="continue from this run's UNet and text encoder")
    train.add_argument("--samples", type=int, default=100)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--tokenizer-dir", default="")
    export = sub.add_parser("export")
    export.add_argument("trained", type=Path)
    export.add_argument("model_dir", type=Path)
    unpack = sub.add_parser("unpack")
    unpack.add_argument("model_dir", type=Path)
    unpack.add_argument("out", type=Path)
    unpack.add_argument("--tokenizer-dir", default="")
    args = parser.parse_args(argv)
    if args.command == "export":
        export_model(args.trained, args.model_dir)
    elif args.command == "unpack":
        unpack_model(args.model_dir, args.out, args.tokenizer_dir)
    else:
        run_training(args)


SHIPPED = Path(__file__).resolve().parents[1] / "dreambooth" / "demo" / "model"
"""The shipped SD 1.x demo model's folder."""
SDXL_FILE = "shapes-sdxl.safetensors"
SD1_FILE = "shapes-sd1.safetensors"


def run_training(args: argparse.Namespace) -> None:
    """Both phases (SDXL: the text-to-image phase alone), the scoring and the files, into ``args.out``."""
    from dreambooth.models.components import Components
    from dreambooth.models.tokenizer import find_tokenizer_dir, load_clip_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(args.seed)
    tokenizer_dir = find_tokenizer_dir(args.tokenizer_dir, args.out / "tokenizer")
    tokenizer = load_clip_tokenizer(tokenizer_dir)
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    if args.family == "sdxl":
        base = load_shipped(args.base, tokenizer_dir, args.out / "cache")
        components = build_sdxl_components(base, tokenizer_dir, args.seed, args.warm_start)
        components.vae.to(device).eval().requires_grad_(False)
        vae = components.vae
    else:
        unet, vae, text_encoder = build_components(args.seed)
        components = Components(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=None)
    if args.init_from:
        from safetensors.torch import load_file

        for name in ("unet", "text_encoder_2" if args.family == "sdxl" else "text_encoder"):
            state = load_file(str(args.init_from / f"{name}.safetensors"))
            getattr(components, name).load_state_dict({k: v.float() for k, v in state.items()})
        report["init_from"] = str(args.init_from)
    if args.family == "sdxl":
        report["vae_from"] = str(args.base)
    elif args.vae_from:
        from safetensors.torch import load_file

        vae.load_state_dict({k: v.float() for k, v in load_file(str(args.vae_from / "vae.safetensors")).items()})
        vae.to(device).eval().requires_grad_(False)
        report["vae_from"] = str(args.vae_from)
    else:
        report.update(train_vae(vae, args.vae_seconds, args.vae_batch, device, generator))
    previous = json.loads((args.vae_from / "configs.json").read_text())["vae"] if args.vae_from else {}
    if args.family == "sdxl":
        previous = {"scaling_factor": vae.config.scaling_factor}
    # a reused autoencoder keeps its scale: a continued UNet was trained on latents of that scale
    vae.register_to_config(scaling_factor=previous.get("scaling_factor") or latent_scale(vae, device, generator))
    report["scaling_factor"] = vae.config.scaling_factor
    print(report, flush=True)
    started = time.time()
    pool = SceneLatents(vae, tokenizer, args.pool, device, generator)
    report["pool_seconds"] = round(time.time() - started, 1)
    report.update(train_unet(components, pool, vae.config.scaling_factor, args.unet_seconds, args.batch, args.lr,
                             args.text_lr, device))
    print(report, flush=True)
    save_run(args.out, components)
    report["accuracy"] = score_prompt_families(components, args.samples, device)
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report["accuracy"], indent=1), flush=True)


def load_shipped(model_dir: Path, tokenizer_dir: Path, cache: Path) -> Any:
    """The shipped SD 1.x demo model's components."""
    from dreambooth.models.load import load_model

    return load_model(model_dir / SD1_FILE, cache_dir=cache, tokenizer_dir=str(tokenizer_dir),
                      config_dir=str(model_dir / "config")).components


def score_prompt_families(components: Any, samples: int, device: torch.device,
                          seed: int = 1234) -> dict[str, dict[str, float]]:
    """Accuracy of each asked-for attribute over ``samples`` pictures per prompt family (prompts cycled)."""
    from dreambooth.demo.evaluate import judge_batch
    from dreambooth.demo.sampling import sample_images

    results = {}
    for family, prompts in prompt_families().items():
        chosen = [prompts[i * len(prompts) // samples] if len(prompts) >= samples else prompts[i % len(prompts)]
                  for i in range(samples)]  # spread over the whole list: it is ordered by shape
        images = sample_images(components, [p for p, _ in chosen], seed=seed, device=device)
        verdicts = judge_batch(images)
        scores: dict[str, list[bool]] = {}
        for (_, wanted), verdict in zip(chosen, verdicts):
            for key, value in wanted.items():
                scores.setdefault(key, []).append(getattr(verdict, key) == value)
            scores.setdefault("all", []).append(all(getattr(verdict, k) == v for k, v in wanted.items()))
        results[family] = {k: round(sum(v) / len(v), 3) for k, v in scores.items()}
    return results


def export_model(trained: Path, model_dir: Path) -> Path:
    """Turn a training run's component files into the shipped kind of single file (fp16, the family's original
    layout, by the family's own exporter: SD 1.x's, or SDXL's when the run has a second text encoder) with its
    config folder beside it and in its header, so it loads with no ``model_config_dir``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dreambooth.demo.settings import DEMO_MODEL_TITLE
    from dreambooth.models.components import Components
    from dreambooth.models.export import checkpoint_tensors, config_metadata, save_checkpoint
    from dreambooth.models.families import family_named
    from dreambooth.models.load import read_config_folder

    configs = json.loads((trained / "configs.json").read_text())
    sdxl = "text_encoder_2" in configs

    def text(cls: Any, name: str) -> Any:
        config = {k: v for k, v in configs[name].items() if k in TEXT_ENCODER or k == "hidden_act"}
        return cls(CLIPTextConfig(**config))

    models = {"unet": UNet2DConditionModel(**_public(configs["unet"])), "vae": AutoencoderKL(**_public(configs["vae"])),
              "text_encoder": text(CLIPTextModel, "text_encoder")}
    if sdxl:
        models["text_encoder_2"] = text(CLIPTextModelWithProjection, "text_encoder_2")
    for name, model in models.items():
        state = {k: v.float() for k, v in load_file(str(trained / f"{name}.safetensors")).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        wrong = [k for k in [*missing, *unexpected] if not k.endswith("position_ids")]  # a buffer in some versions
        if wrong:
            raise ValueError(f"{name}: the run's weights do not fit its config: {wrong[:5]}")
    components = Components(**models, tokenizer=None, tokenizer_2=None, scheduler=DDPMScheduler(**DDPM))
    family = family_named("sdxl" if sdxl else "sd1")
    model_dir.mkdir(parents=True, exist_ok=True)
    config_dir = write_config_folder(configs, model_dir / "config")
    title = "DreamBooth demo: shapes (tiny SDXL)" if sdxl else DEMO_MODEL_TITLE
    metadata = {"modelspec.architecture": family.architecture("epsilon"), "modelspec.resolution": "64x64",
                "modelspec.prediction_type": "epsilon", "modelspec.title": title,
                **config_metadata(read_config_folder(config_dir))}
    tensors = checkpoint_tensors(components, dtype=torch.float16, family=family)
    return save_checkpoint(model_dir / (SDXL_FILE if sdxl else SD1_FILE), tensors, metadata)


def unpack_model(model_dir: Path, out: Path, tokenizer_dir: str = "") -> Path:
    """The inverse of :func:`export_model`: the shipped file as a run folder for ``--init-from``/``--vae-from``."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        components = load_shipped(model_dir, tokenizer_dir, Path(scratch) / "cache")
    return save_run(out, components)


def save_run(out: Path, components: Any) -> Path:
    """A run folder: the components as diffusers-named fp16 safetensors, plus their configs."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    configs = {}
    for name, model in components.models.items():
        state = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(out / f"{name}.safetensors"))
        configs[name] = model.config.to_dict() if name.startswith("text_encoder") else dict(model.config)
    (out / "configs.json").write_text(json.dumps(configs, indent=1, default=list))
    return out


def _public(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def write_config_folder(configs: dict[str, dict], folder: Path) -> Path:
    """The diffusers config folder (JSON only) that lets the single file load offline: SD 1.x's, or SDXL's when the
    run has a second text encoder."""
    sdxl = "text_encoder_2" in configs
    texts = [("text_encoder", "CLIPTextModel", TEXT_ENCODER)]
    if sdxl:
        texts.append(("text_encoder_2", "CLIPTextModelWithProjection", TEXT_ENCODER_2))
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
        "_diffusers_version": "0.31.0",
        "scheduler": ["diffusers", "EulerDiscreteScheduler" if sdxl else "PNDMScheduler"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    for name, cls, _ in texts:
        index[name] = ["transformers", cls]
        index[name.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
    if sdxl:
        index["force_zeros_for_empty_prompt"] = True
    else:
        index.update(feature_extractor=[None, None], requires_safety_checker=False, safety_checker=[None, None])
    for name in ("unet", "vae", "scheduler", *(name for name, _, _ in texts)):
        (folder / name).mkdir(parents=True, exist_ok=True)
    _write_json(folder / "model_index.json", index)
    for name, cls in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL")):
        _write_json(folder / name / "config.json", {"_class_name": cls, "_diffusers_version": "0.31.0",
                                                    **_public(configs[name])})
    for name, cls, base in texts:
        text = {k: configs[name].get(k, v) for k, v in base.items()}
        text.update({"architectures": [cls], "model_type": "clip_text_model", "bos_token_id": 49406,
                     "eos_token_id": 49407, "pad_token_id": 1, "layer_norm_eps": 1e-5, "torch_dtype": "float32"})
        _write_json(folder / name / "config.json", text)
    if sdxl:
        scheduler = {"_class_name": "EulerDiscreteScheduler", "interpolation_type": "linear",
                     "timestep_spacing": "leading", "use_karras_sigmas": False,
                     **{k: v for k, v in SCHEDULER.items() if k != "clip_sample"}}
    else:
        scheduler = {"_class_name": "PNDMScheduler", "skip_prk_steps": True, **SCHEDULER}
    _write_json(folder / "scheduler" / "scheduler_config.json",
                {"_diffusers_version": "0.31.0", "trained_betas": None, **scheduler})
    return folder


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
