"""Peak GPU memory, steps/s and time to the first step of the engine on a full-size SDXL or SD 2.x model built from a
seed (no weights needed: speed and memory do not depend on their values), 1024 px (SDXL) or 768 px (SD 2.x v),
batch 1, prior preservation, UNet only.

Usage: python bench/family_memory.py --family sdxl --modes lowmem-adafactor lowmem speed --steps 30 --out OUT
       python bench/family_memory.py --family sdxl --tiny ...   (a CPU smoke run on the tests' tiny model)
       --mixed-shapes: the instance photos are square, 3:4 portrait and 4:3 landscape (three aspect-ratio buckets,
       so no CUDA graphs); without it they are square, as before buckets.
Writes OUT/<family>-<mode>.json per mode and prints one table row each. With several modes each runs in its own
process, so none starts with memory another left behind.

Memory, all ``torch.cuda`` statistics: ``peak_gb`` the process's peak allocated (loading, caching, recording the
CUDA graph, steps); ``peak_before_steps_gb`` its part up to the ``started`` event (CUDA graphs recorded by then);
``peak_steps_gb`` the steps' own (a recorded step's temporaries live in the graph's pool, which counts as reserved,
not allocated, while it replays); ``peak_reserved_gb`` the most the caching allocator held from the driver (what a
card must have, plus the CUDA context).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

MODES = {
    "lowmem": {"weights_dtype": "bf16", "mixed_precision": "bf16", "optimizer": "adamw_8bit",
               "gradient_checkpointing": True, "optimizer_in_backward": True, "cuda_graphs": True},
    "lowmem-adafactor": {"weights_dtype": "bf16", "mixed_precision": "bf16", "optimizer": "adafactor",
                         "gradient_checkpointing": True, "optimizer_in_backward": True, "cuda_graphs": True},
    "lowmem-adafactor-nograph": {"weights_dtype": "bf16", "mixed_precision": "bf16", "optimizer": "adafactor",
                                 "gradient_checkpointing": True, "optimizer_in_backward": True, "cuda_graphs": False},
    "lowmem-nograph": {"weights_dtype": "bf16", "mixed_precision": "bf16", "optimizer": "adamw_8bit",
                       "gradient_checkpointing": True, "optimizer_in_backward": True, "cuda_graphs": False},
    "speed": {"weights_dtype": "bf16", "mixed_precision": "bf16", "optimizer": "adamw", "cuda_graphs": True,
              "channels_last": True},
}


def build_folder(family_name: str, folder: Path, tokenizer_dir: Path, tiny: bool) -> Path:
    """A diffusers folder of the family's released shape (or the tests' tiny one) with seeded random weights."""
    from dreambooth.models.families import family_named
    from dreambooth.models.pipeline import inference_pipeline

    if (folder / "model_index.json").is_file():
        return folder
    components = build_components(family_name, tokenizer_dir, tiny)
    inference_pipeline(family_named(family_name), components).save_pretrained(str(folder))
    return folder


def build_components(family_name: str, tokenizer_dir: Path, tiny: bool):  # -> Components
    """The family's released shape (SD 2.x: 768 px v-prediction; or the tests' tiny one) with seeded random
    weights, in fp16. Built on the GPU when there is one; on a CPU each module is built in fp16 directly (a
    full-size SDXL in fp32 would need 14 GB of memory on the way)."""
    import diffusers
    import transformers

    from dreambooth.models.components import Components
    from dreambooth.models.families import family_named
    from dreambooth.models.tokenizer import load_clip_tokenizer

    family = family_named(family_name)
    torch.manual_seed(0)
    if tiny:
        from tiny_families import build_tiny_sd2, build_tiny_sdxl

        components = build_tiny_sdxl(tokenizer_dir) if family_name == "sdxl" else build_tiny_sd2(
            tokenizer_dir, prediction_type="v_prediction", unused_layers=0)
    else:
        config_dir = family.stock_config_folder("v_prediction" if family_name == "sd2" else "epsilon")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        default_dtype = torch.get_default_dtype()
        if device == "cpu":
            torch.set_default_dtype(torch.float16)
        with torch.device(device):
            unet = diffusers.UNet2DConditionModel.from_config(json.loads((config_dir / "unet/config.json").read_text()))
            vae = diffusers.AutoencoderKL.from_config(json.loads((config_dir / "vae/config.json").read_text()))
            encoders = {
                name: getattr(transformers, family.text_encoder_classes[name])(
                    transformers.CLIPTextConfig.from_json_file(str(config_dir / name / "config.json")))
                for name in family.text_encoder_names
            }
        torch.set_default_dtype(default_dtype)
        scheduler = diffusers.DDPMScheduler.from_pretrained(str(config_dir), subfolder="scheduler")
        tokenizers = {name: load_clip_tokenizer(tokenizer_dir, pad) for name, pad in family.pad_tokens.items()}
        components = Components(unet=unet, vae=vae, scheduler=scheduler, **encoders, **tokenizers)
    for model in components.models.values():
        model.to(torch.float16)
    return components


def draw_photos(folder: Path, count: int, size: int, seed: int, mixed_shapes: bool = False) -> Path:
    """``count`` pictures of a disc on a varied background: squares, or (``mixed_shapes``) square, 3:4 and 4:3 in
    turn."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        shape = [(size, size), (size * 3 // 4, size), (size, size * 3 // 4)][i % 3 if mixed_shapes else 0]
        image = Image.new("RGB", shape, tuple(int(v) for v in rng.integers(0, 255, 3)))
        r = size // 4
        ImageDraw.Draw(image).ellipse([r, r, 3 * r, 3 * r], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        image.save(folder / f"{i}.png")
    return folder


def run_mode(family: str, mode: str, model: Path, work: Path, steps: int, resolution: int, tokenizer_dir: Path,
             tiny: bool, mixed_shapes: bool = False) -> dict:
    from dreambooth.config import TrainConfig
    from dreambooth.engine import run
    from dreambooth.events import Events

    steps_seen: list[tuple[float, int, float | None]] = []
    started = time.perf_counter()
    before_steps: dict[str, object] = {}

    def on_event(event: dict) -> None:
        if event["event"] == "step":
            steps_seen.append((time.perf_counter(), event["step"], event.get("memory_mb")))
        if event["event"] == "started":
            before_steps["optimizer"], before_steps["cuda_graphs"] = event["optimizer"], event["cuda_graphs"]
            if torch.cuda.is_available():  # the steps' own peak from here on
                before_steps["peak"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
        if event["event"] in ("warning", "error", "started"):
            print(json.dumps(event), flush=True)

    config = TrainConfig.from_dict({
        "model_name": f"{family}-{mode}", "source_checkpoint": str(model), "tokenizer_dir": str(tokenizer_dir),
        "resolution": resolution, "max_steps": steps, "save_every": 0, "learning_rate": 1e-5, "log_every": 1,
        "batch_size": 1, "prior_preservation": True, "save_dtype": "fp16",
        "device": "cpu" if tiny else "cuda",
        "concepts": [{"instance_dir": str(draw_photos(work / "instance", 5, resolution, 0, mixed_shapes)),
                      "instance_prompt": "photo of zwx disc", "class_prompt": "photo of a disc",
                      "class_dir": str(draw_photos(work / "class", 5, resolution, 1)), "num_class_images": 5}],
        **(MODES[mode] if not tiny else {}),
    })
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = run(config, work / "model", Events(on_event=on_event))
    first = steps_seen[0][0] - started if steps_seen else None
    later = [t for t, s, _ in steps_seen if s > steps // 3]
    rate = (len(later) - 1) / (later[-1] - later[0]) if len(later) > 1 else None
    steps_peak = max((m / 1024 for _, _, m in steps_seen if m is not None), default=None)
    before_peak = before_steps.get("peak")
    peaks = [p for p in (before_peak, steps_peak) if p is not None]
    return {"family": family, "mode": mode, "resolution": resolution, "mixed_shapes": mixed_shapes,
            "steps": result.step,
            "optimizer": before_steps.get("optimizer"), "cuda_graphs": before_steps.get("cuda_graphs"),
            "first_step_s": first, "steps_per_s": rate, "peak_gb": max(peaks) if peaks else None,
            "peak_before_steps_gb": before_peak, "peak_steps_gb": steps_peak,
            "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None,
            "losses": result.losses,
            "checkpoint_mb": result.checkpoints[-1].stat().st_size / 2**20 if result.checkpoints else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("sdxl", "sd2"), default="sdxl")
    parser.add_argument("--modes", nargs="+", default=["lowmem-adafactor", "lowmem", "speed"], choices=list(MODES))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/family-bench"))
    parser.add_argument("--tokenizer-dir", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--mixed-shapes", action="store_true")
    args = parser.parse_args()
    resolution = (128 if args.mixed_shapes else 64) if args.tiny else (1024 if args.family == "sdxl" else 768)
    started = time.perf_counter()
    model = build_folder(args.family, args.work / f"{args.family}-model", args.tokenizer_dir, args.tiny)
    print(f"built the {args.family} model in {time.perf_counter() - started:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    for mode in args.modes:
        if len(args.modes) > 1:  # each mode in a process of its own: no memory, cache or graph pool carried over
            command = [sys.executable, __file__, "--family", args.family, "--modes", mode, "--steps", str(args.steps),
                       "--out", str(args.out), "--work", str(args.work), "--tokenizer-dir", str(args.tokenizer_dir),
                       *(["--tiny"] if args.tiny else []), *(["--mixed-shapes"] if args.mixed_shapes else [])]
            subprocess.run(command, check=False)
            continue
        row = run_mode(args.family, mode, model, args.work / mode, args.steps, resolution, args.tokenizer_dir,
                       args.tiny, args.mixed_shapes)
        name = f"{args.family}-{mode}{'-mixed' if args.mixed_shapes else ''}"
        (args.out / f"{name}.json").write_text(json.dumps(row, indent=2))
        print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)


if __name__ == "__main__":
    main()
