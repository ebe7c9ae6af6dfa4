"""The engine side by side with the reference trainers, in one GPU invocation (issue 15 item 7, issue 16 item 6).

    python bench/peers.py prepare --kohya-mirror DIR --diffusers-mirror DIR   # here: fetched scripts into build/
    bash bench/peers.sh OUT [--runs ...]                                      # on the GPU machine: every row
    python bench/peers.py run --out OUT --tiny --runs engine:sdxl-speed ...   # the plumbing on a CPU, tiny models

Rows (``RUNS``, each ``runner:mode``, each in its own process, most important first):

- SDXL full fine-tune, 1024 px, prior preservation, UNet only: kohya-ss/sd-scripts ``sdxl_train.py`` at its
  recommended memory flags (``KOHYA_MODES``) against the engine's modes (``FULL_MODES``: those of
  ``bench/family_memory.py``, so a mode added there is a row here, plus ``lowmem-adafactor``).
- SDXL LoRA, 1024 px: kohya's ``sdxl_train_network.py`` (``networks.lora``) against the engine's LoRA modes.
- SD 2.x 768 px v-prediction full fine-tune: diffusers' ``examples/dreambooth/train_dreambooth.py`` at its best
  loader flags against the engine's modes.

Models: the families' released architectures with random weights from a seed (speed and memory do not depend on
the values), built on the GPU machine: SDXL written as one ``.safetensors`` file in the original layout (what web
UI users and kohya's users pick; both kohya and the engine read that file), SD 2.x as a diffusers folder (what
diffusers' script reads; the engine reads the same folder). Work: 10 instance + 20 class JPEGs at the family's
resolution, two images through the UNet a step: the engine and diffusers take batch 1 with prior preservation (1
instance + 1 class image), kohya mixes the class images into its pool, so it runs batch 2 (``--train_batch_size
2``) for the same work per step. Constant learning rate (full: 5e-6, LoRA: 1e-4, rank 16, alpha 16).

Reported per row: steps/s over the timed window (after the warm-up steps), images/s, peak
``torch.cuda.max_memory_allocated`` of the whole process and of the steps alone (``bench/timing.py``), time to the
first step (process launch → end of step 1: imports, loading the file, caching, recording, compiling), whether
every logged loss is finite, and for the engine what it switched on. Ratios: ``PAIRS``. Each process ends at the
end of its timed window (no final save). A row that would not fit the time left (``--budget``) is skipped and
listed as such, so the most important rows come back whatever happens to the later ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(REPO))

from engine_run import COMMON as ENGINE_COMMON  # noqa: E402
from family_memory import MODES  # noqa: E402
from lora import ENGINE_COMMON as LORA_COMMON  # noqa: E402
from lora import LOWMEM as LORA_LOWMEM  # noqa: E402
from lora import read_events, traceback_of  # noqa: E402

BUILD = REPO / "build"
INSTANCE_PROMPT, CLASS_PROMPT = "a photo of zwx dog", "a photo of dog"
INSTANCE_TOKEN, CLASS_TOKEN = "zwx dog", "dog"  # kohya's captions come from its folder names
RESOLUTION = {"sdxl": 1024, "sd2": 768}
STEPS = {"sdxl": (5, 20), "sd2": (10, 40)}
"""(warm-up, timed) steps per family: SDXL steps take 0.1–1 s, SD 2.x steps 0.05–0.3 s."""
INSTANCE_IMAGES, CLASS_IMAGES = 10, 20
IMAGES_PER_STEP = 2
FULL_LR = 5e-6

# ---------------------------------------------------------------- the engine's modes (TrainConfig values)

LOWMEM_ADAFACTOR = {"optimizer": "adafactor", "weights_dtype": "bf16", "optimizer_in_backward": True,
                    "gradient_checkpointing": True}
"""Adafactor fused into the backward pass on the flat bf16 path (kohya's and OneTrainer's low-memory recipe). Until
the engine has it, its configuration is refused and the row says so; ``bench/family_memory.py``'s own
``lowmem-adafactor``, once there, replaces this one."""
FULL_MODES = {**MODES}
FULL_MODES.setdefault("lowmem-adafactor", LOWMEM_ADAFACTOR)
LORA_MODES = {
    "lora": {},  # attention + feed-forward (the default): the layers kohya's networks.lora adapts
    "lora-attn": {"lora_layers": "attention"},  # diffusers' scripts' layers
    "lora-lowmem": LORA_LOWMEM,
    "lora-lowmem-fp8": {**LORA_LOWMEM, "lora_base_precision": "fp8"},  # kohya's --fp8_base
}
FULL_COMMON = {**{k: v for k, v in ENGINE_COMMON.items() if k != "resolution"}, "batch_size": 1, "log_every": 10,
               "learning_rate": FULL_LR}


def engine_modes(full: dict[str, dict], lora: dict[str, dict]) -> dict[str, tuple[str, dict]]:
    """Every engine row: ``family-mode`` → (family, TrainConfig values); each full mode for SDXL and SD 2.x, each
    LoRA mode for SDXL."""
    modes = {}
    for family in ("sdxl", "sd2"):
        for name, options in full.items():
            modes[f"{family}-{name}"] = (family, {**FULL_COMMON, **options})
    for name, options in lora.items():
        modes[f"sdxl-{name}"] = ("sdxl", {**LORA_COMMON, **options})
    return modes


ENGINE_MODES = engine_modes(FULL_MODES, LORA_MODES)

# ---------------------------------------------------------------- kohya's modes

KOHYA_COMMON = [
    "--mixed_precision", "bf16", "--sdpa",
    "--cache_latents", "--cache_text_encoder_outputs",
    "--max_data_loader_n_workers", "4", "--persistent_data_loader_workers",
    "--train_batch_size", str(IMAGES_PER_STEP),
    "--lr_scheduler", "constant", "--seed", "0",
    "--save_precision", "fp16", "--save_model_as", "safetensors",
]
"""Every kohya row: bf16, PyTorch's attention kernel, latents and both text encoders' outputs cached in memory
(its docs' SDXL advice), 4 persistent loader workers, batch 2 (= our 1 instance + 1 class image a step). The class
images' loss weight is its default, 1.0 (``sdxl_train.py`` has no ``--prior_loss_weight``)."""
ADAFACTOR = ["--optimizer_type", "adafactor",
             "--optimizer_args", "scale_parameter=False", "relative_step=False", "warmup_init=False"]
"""The Adafactor settings of kohya's SDXL docs (``docs/train_SDXL-en.md``: fixed learning rate)."""
KOHYA_LORA = ["--network_module", "networks.lora", "--network_dim", "16", "--network_alpha", "16",
              "--network_train_unet_only", "--optimizer_type", "AdamW", "--learning_rate", "1e-4", "--unet_lr", "1e-4"]
"""networks.lora (attention and feed-forward linears of the transformer blocks), U-Net only as its docs advise;
torch's AdamW: its docs' AdamW8bit needs bitsandbytes, absent on the GPU machine (8-bit moments of 23 M LoRA
weights would save about 0.1 GB)."""
KOHYA_MODES: dict[str, tuple[str, list[str]]] = {
    # its documented low-memory full fine-tune: bf16 weights and gradients, Adafactor stepped inside the backward
    # pass, checkpointing (README 2024-05, PR #1259; docs/train_SDXL-en.md); its default clipping (1.0, per tensor)
    "sdxl-ft": ("sdxl_train.py", [*ADAFACTOR, "--full_bf16", "--fused_backward_pass", "--gradient_checkpointing",
                                  "--learning_rate", str(FULL_LR)]),
    "sdxl-ft-noclip": ("sdxl_train.py", [*ADAFACTOR, "--full_bf16", "--fused_backward_pass",
                                         "--gradient_checkpointing", "--learning_rate", str(FULL_LR),
                                         "--max_grad_norm", "0"]),
    # its fastest on a large GPU: the same without the fused step and without checkpointing
    "sdxl-ft-speed": ("sdxl_train.py", [*ADAFACTOR, "--full_bf16", "--learning_rate", str(FULL_LR)]),
    "sdxl-lora": ("sdxl_train_network.py", [*KOHYA_LORA, "--gradient_checkpointing"]),
    "sdxl-lora-speed": ("sdxl_train_network.py", KOHYA_LORA),
    # its lowest-memory LoRA: base weights in fp8 too (docs/train_network_advanced.md, "experimental")
    "sdxl-lora-fp8": ("sdxl_train_network.py", [*KOHYA_LORA, "--gradient_checkpointing", "--fp8_base"]),
}

# ---------------------------------------------------------------- diffusers' modes

DIFFUSERS_WORKERS = ["--dataloader_num_workers", "4", "--bench-persistent-workers"]
"""Its best loader settings (``bench/run.py``'s REFERENCE_LOADER): 4 workers, kept between epochs."""
DIFFUSERS_MODES: dict[str, tuple[str, list[str]]] = {
    "sd2-bf16": ("train_dreambooth.py", ["--mixed_precision", "bf16", *DIFFUSERS_WORKERS]),
    "sd2-bf16-ckpt": ("train_dreambooth.py", ["--mixed_precision", "bf16", "--gradient_checkpointing",
                                              *DIFFUSERS_WORKERS]),
}
"""``--mixed_precision bf16`` (fp32 weights and AdamW, bf16 autocast); no ``--use_8bit_adam`` (no bitsandbytes on
the GPU machine)."""

RUNS = [
    "engine:sdxl-lowmem-adafactor", "kohya:sdxl-ft", "engine:sdxl-lora-lowmem-fp8", "engine:sdxl-speed",
    "kohya:sdxl-lora", "engine:sdxl-lora", "diffusers:sd2-bf16", "engine:sd2-speed", "kohya:sdxl-lora-fp8",
    "engine:sdxl-lowmem", "engine:sdxl-lora-lowmem", "engine:sd2-lowmem",
    "kohya:sdxl-ft-speed", "kohya:sdxl-lora-speed", "kohya:sdxl-ft-noclip", "diffusers:sd2-bf16-ckpt",
]
"""The default rows, most important first (the budget may end the list early): one pair of each of the three
comparisons before the second engine mode of the last two."""
PAIRS = [
    ("SDXL full, kohya's low-memory flags", "kohya:sdxl-ft",
     ["engine:sdxl-speed", "engine:sdxl-lowmem", "engine:sdxl-lowmem-adafactor"]),
    ("SDXL full, kohya without clipping", "kohya:sdxl-ft-noclip",
     ["engine:sdxl-lowmem", "engine:sdxl-lowmem-adafactor"]),
    ("SDXL full, kohya's fastest", "kohya:sdxl-ft-speed", ["engine:sdxl-speed", "engine:sdxl-lowmem"]),
    ("SDXL LoRA, kohya's low-memory flags", "kohya:sdxl-lora", ["engine:sdxl-lora", "engine:sdxl-lora-lowmem"]),
    ("SDXL LoRA, kohya without checkpointing", "kohya:sdxl-lora-speed", ["engine:sdxl-lora", "engine:sdxl-lora-attn"]),
    ("SDXL LoRA, kohya with fp8 base weights", "kohya:sdxl-lora-fp8",
     ["engine:sdxl-lora-lowmem-fp8", "engine:sdxl-lora-lowmem"]),
    ("SD 2.x 768 v, diffusers with 4 loader workers", "diffusers:sd2-bf16", ["engine:sd2-speed", "engine:sd2-lowmem"]),
    ("SD 2.x 768 v, diffusers with checkpointing", "diffusers:sd2-bf16-ckpt", ["engine:sd2-lowmem"]),
]
"""Ratios reported: each of ours against the peer's row named first (steps/s: same images a step; peak memory)."""
MIN_ROW_S = 45
"""A row is started only with at least this many seconds of the budget left ..."""
BUILD_S = {"sdxl": 60, "sd2": 30}
"""... plus, before the first row of a family, about what building its model takes on the GPU machine."""

KOHYA_FILES = ("library", "networks", "sdxl_train.py", "sdxl_train_network.py", "train_network.py")
"""What of sd-scripts the two scripts import (copied from a fetched mirror into build/sd-scripts, never committed)."""
WHEELS = ["diffusers==0.42.1", "peft==0.21.2", "toml==0.10.2", "voluptuous==0.16.0", "imagesize==2.0.1"]
"""Carried as wheels into ``.whl`` (installed to /tmp/site on the GPU machine, which has no diffusers or peft):
diffusers and peft for the engine and diffusers' script; toml, voluptuous and imagesize for kohya's."""
KOHYA_WHEELS = ["transformers==4.54.1", "tokenizers==0.21.4", "huggingface_hub==0.34.4", "diffusers==0.32.1"]
"""Carried into ``.whl/kohya`` (installed to /tmp/site-kohya, first on ``PYTHONPATH`` for kohya's rows alone):
the versions sd-scripts pins (requirements.txt). Its code does not import under transformers 5 (the GPU machine's
5.17: ``CLIPFeatureExtractor`` is gone, ``library/lpw_stable_diffusion.py``), transformers 4.54 needs a
huggingface_hub below 1.0 and tokenizers 0.21, and diffusers 0.42 needs a huggingface_hub of 1.32 or later, so
kohya gets its own diffusers 0.32.1 too."""


# ---------------------------------------------------------------- models and data

def kind_of(name: str) -> tuple[str, str]:
    runner, _, mode = name.partition(":")
    return runner, mode


def family_of(name: str) -> str:
    runner, mode = kind_of(name)
    if runner == "engine":
        return ENGINE_MODES[mode][0]
    return "sd2" if mode.startswith("sd2") else "sdxl"


def model_path(family: str, work: Path, tiny: bool) -> Path:
    """Where :func:`build_model` writes ``family``'s model."""
    if tiny:  # a tiny SDXL as a folder too: a single file would need its configs embedded
        return work / f"{family}-tiny"
    return work / ("sdxl.safetensors" if family == "sdxl" else "sd2-768v")


def build_model(family: str, work: Path, tokenizer: Path, tiny: bool) -> Path:
    """SDXL: one seeded ``.safetensors`` file in the original layout; SD 2.x (768 v): a seeded diffusers folder.
    Run in a process of its own (``peers.py build``), so that the rows find the GPU's memory untouched."""
    from family_memory import build_components, build_folder

    path = model_path(family, work, tiny)
    if family == "sd2" or tiny:
        return build_folder(family, path, tokenizer, tiny)
    if path.is_file():
        return path
    import torch

    from dreambooth.models.export import checkpoint_tensors, modelspec, save_checkpoint
    from dreambooth.models.families import family_named

    family_ = family_named("sdxl")
    components = build_components("sdxl", tokenizer, tiny=False)
    tensors = checkpoint_tensors(components, dtype=torch.float16, family=family_)
    del components
    save_checkpoint(path, tensors, modelspec(family_, "epsilon", RESOLUTION["sdxl"], "seeded SDXL (bench)"))
    return path


def build_data(work: Path, family: str, resolution: int) -> tuple[Path, Path]:
    """10 instance + 20 class JPEGs at the family's resolution (``bench/dataset.py``)."""
    from dataset import build_dataset

    return build_dataset(work / f"data-{family}-{resolution}", INSTANCE_IMAGES, CLASS_IMAGES,
                         sizes=(resolution, resolution))


def kohya_data(instance: Path, klass: Path, root: Path) -> tuple[Path, Path]:
    """kohya's DreamBooth folders (``<repeats>_<caption>``) linking to the same pictures. 10 repeats of the
    instance pictures make its epoch 100 instance + 100 class pictures long (50 steps at batch 2)."""
    train, reg = root / "img", root / "reg"
    for parent, sub, src in ((train, f"10_{INSTANCE_TOKEN}", instance), (reg, f"1_{CLASS_TOKEN}", klass)):
        folder = parent / sub
        folder.mkdir(parents=True, exist_ok=True)
        for picture in sorted(src.glob("*.jpg")):
            link = folder / picture.name
            if not link.exists():
                link.symlink_to(picture.resolve())
    return train, reg


def kohya_tokenizers(tokenizer: Path, root: Path) -> Path:
    """``--tokenizer_cache_dir`` for kohya: its two CLIP tokenizers under the names it looks for (no network)."""
    pads = {"openai_clip-vit-large-patch14": "<|endoftext|>", "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k": "!"}
    for name, pad in pads.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for file in ("vocab.json", "merges.txt"):
            shutil.copyfile(tokenizer / file, folder / file)
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad}))
    return root


# ---------------------------------------------------------------- one row's command line

@dataclasses.dataclass
class Setting:
    """What every row of a run shares."""

    work: Path
    tokenizer: Path
    scripts: Path  # build/: sd-scripts/ and reference/
    warmup: dict[str, int]
    steps: dict[str, int]
    resolution: dict[str, int]
    loader_workers: int
    tiny: bool


def engine_command(mode: str, s: Setting, model: Path, instance: Path, klass: Path, timing: Path, folder: Path):
    """The engine's config.json (in ``folder``) and command line; raises what TrainConfig refuses."""
    from dreambooth.config import Concept, TrainConfig

    family, options = ENGINE_MODES[mode]
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    wanted = {
        **options,
        "resolution": s.resolution[family],
        "max_steps": s.warmup[family] + s.steps[family] + 2,
        "model_name": f"bench-{mode}",
        "source_checkpoint": str(model),
        "tokenizer_dir": str(s.tokenizer),
        "output_dir": str(folder / "out"),
    }
    if s.tiny:
        wanted["device"] = "cpu"
    dropped = sorted(k for k in wanted if k not in known)
    config = TrainConfig(**{k: v for k, v in wanted.items() if k in known})
    config.concepts = [Concept(instance_dir=str(instance), instance_prompt=INSTANCE_PROMPT, class_prompt=CLASS_PROMPT,
                               class_dir=str(klass), num_class_images=len(list(klass.glob("*.jpg"))))]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(config.to_dict(), indent=1))
    return [sys.executable, str(HERE / "engine_run.py"), str(timing), str(s.warmup[family]), str(s.steps[family]),
            str(path), ",".join(dropped)]


def kohya_command(mode: str, s: Setting, model: Path, instance: Path, klass: Path, timing: Path, folder: Path):
    """kohya's script under ``bench/kohya_run.py``."""
    script, flags = KOHYA_MODES[mode]
    family = "sdxl"
    train, reg = kohya_data(instance, klass, folder.parent / f"kohya-data-{s.resolution[family]}")
    argv = [
        sys.executable, str(HERE / "kohya_run.py"), str(timing), str(s.warmup[family]), str(s.steps[family]),
        str(s.scripts / "sd-scripts" / script),
        "--pretrained_model_name_or_path", str(model),
        "--train_data_dir", str(train), "--reg_data_dir", str(reg),
        "--resolution", f"{s.resolution[family]},{s.resolution[family]}",
        "--output_dir", str(folder / "out"), "--output_name", f"bench-{mode}",
        "--max_train_steps", str(s.warmup[family] + s.steps[family] + 2),
        "--tokenizer_cache_dir", str(kohya_tokenizers(s.tokenizer, folder.parent / "kohya-tokenizers")),
        *KOHYA_COMMON, *flags,
    ]
    argv[argv.index("--max_data_loader_n_workers") + 1] = str(s.loader_workers)
    return argv


def diffusers_command(mode: str, s: Setting, model: Path, instance: Path, klass: Path, timing: Path, folder: Path):
    """diffusers' script under ``bench/reference_run.py``."""
    script, flags = DIFFUSERS_MODES[mode]
    family = "sd2"
    argv = [
        sys.executable, str(HERE / "reference_run.py"), str(timing), str(s.warmup[family]), str(s.steps[family]),
        str(s.scripts / "reference" / script),
        "--pretrained_model_name_or_path", str(model),
        "--instance_data_dir", str(instance), "--class_data_dir", str(klass),
        "--with_prior_preservation", "--prior_loss_weight", "1.0",
        "--instance_prompt", INSTANCE_PROMPT, "--class_prompt", CLASS_PROMPT,
        "--num_class_images", str(len(list(klass.glob("*.jpg")))),
        "--resolution", str(s.resolution[family]), "--center_crop",
        "--learning_rate", str(FULL_LR), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
        "--max_train_steps", str(s.warmup[family] + s.steps[family] + 2),
        "--checkpointing_steps", "100000000",
        "--output_dir", str(folder / "out"), "--seed", "0", "--train_batch_size", "1",
        *flags,
    ]
    argv[argv.index("--dataloader_num_workers") + 1] = str(s.loader_workers)
    if s.tiny:  # the CPU check: no bf16 autocast on a CPU accelerator
        argv[argv.index("bf16")] = "no"
    return argv


COMMANDS = {"engine": engine_command, "kohya": kohya_command, "diffusers": diffusers_command}


# ---------------------------------------------------------------- what a row left behind

def peer_losses(log: Path) -> list[float]:
    """The loss in a peer's progress bar: diffusers' ``loss=…``, kohya's ``avr_loss=…`` (a moving average)."""
    return [float(m) for m in re.findall(r"(?<![a-z_])(?:avr_)?loss=([0-9.eE+-]+|nan|inf)",
                                         log.read_text(errors="replace"))]


def summarize(name: str, timing: dict, launch: float, rc: int, wall: float, steps: int, log: Path) -> dict:
    """One row of results from a run's timing marks and log."""
    row: dict = {"run": name, "rc": rc, "wall_s": round(wall, 1), "images_per_step": IMAGES_PER_STEP}
    if "timed_start" in timing and "timed_end" in timing:
        sps = steps / (timing["timed_end"] - timing["timed_start"])
        row.update(steps_per_s=round(sps, 3), images_per_s=round(sps * IMAGES_PER_STEP, 2))
    for key, field in (("peak_bytes", "peak_gb"), ("peak_steps_bytes", "steps_peak_gb"),
                       ("peak_before_steps_bytes", "before_steps_peak_gb")):
        if key in timing:
            row[field] = round(timing[key] / 1e9, 3)
    if "first_step_done" in timing:
        row["first_step_s"] = round(timing["first_step_done"] - launch, 1)
    row["steps_seen"] = timing.get("steps_seen")
    if timing.get("ignored_options"):
        row["ignored_options"] = timing["ignored_options"]
    if name.startswith("engine:"):
        events = read_events(log)
        losses = events.pop("losses")
        row.update(events)
    else:
        losses = peer_losses(log)
    row["losses_logged"] = len(losses)
    row["losses_finite"] = bool(losses) and all(math.isfinite(v) for v in losses)
    row["last_losses"] = [round(v, 5) for v in losses[-3:]]
    tb = traceback_of(log)
    if tb:
        row["traceback"] = tb
    return row


def environment(kohya_site: Path | None, scripts: Path) -> dict:
    """GPU and library versions: the engine's and diffusers' (this process), kohya's (its own site folder)."""
    import torch

    try:  # asked of nvidia-smi: this process leaves the GPU alone
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        gpu = "none"
    env = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
           "python": platform.python_version(), "torch": torch.__version__, "gpu": gpu}
    for name in ("diffusers", "transformers", "accelerate", "peft", "huggingface_hub"):
        try:
            env[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001 (a missing optional package is reported)
            env[name] = f"absent ({type(exc).__name__})"
    if kohya_site and kohya_site.is_dir():
        env["kohya_site"] = sorted(p.name.removesuffix(".dist-info") for p in kohya_site.glob("*.dist-info"))
    for name in ("sd-scripts", "reference"):
        stamp = scripts / name / "SOURCE"
        env[f"{name}_source"] = stamp.read_text().strip() if stamp.is_file() else "absent"
    return env


def table(rows: list[dict], env: dict) -> str:
    """The markdown table, then each pair's ratios."""
    head = ("| run | rc | steps/s | images/s | peak GB (process) | peak GB (steps) | first step s | losses finite "
            "| engine ran |\n|---|---:|---:|---:|---:|---:|---:|---|---|\n")
    lines = []
    for r in rows:
        s = r.get("started") or {}
        ran = (f"{s.get('weights')}/{s.get('precision')}, {s.get('optimizer')}, graphs {s.get('cuda_graphs')}, "
               f"ckpt {s.get('gradient_checkpointing')}") if s else _failure(r)
        lines.append(f"| {r['run']} | {r.get('rc', '–')} | {r.get('steps_per_s', '–')} | {r.get('images_per_s', '–')} "
                     f"| {r.get('peak_gb', '–')} | {r.get('steps_peak_gb', '–')} | {r.get('first_step_s', '–')} | "
                     f"{r.get('losses_finite', '–')} | {ran} |")
    by = {r["run"]: r for r in rows}
    notes = []
    for label, peer, ours in PAIRS:
        for name in ours:
            a, b = by.get(name, {}), by.get(peer, {})
            if "steps_per_s" in a and "steps_per_s" in b:
                notes.append(
                    f"- {label}: {name} / {peer} = **{a['steps_per_s'] / b['steps_per_s']:.2f}×** steps/s; peak "
                    f"{a.get('peak_gb')} vs {b.get('peak_gb')} GB (process, {_ratio(a, b, 'peak_gb')}), "
                    f"{a.get('steps_peak_gb')} vs {b.get('steps_peak_gb')} GB (steps, "
                    f"{_ratio(a, b, 'steps_peak_gb')}); first step {a.get('first_step_s')} vs "
                    f"{b.get('first_step_s')} s")
    envline = ", ".join(f"{k} {v}" for k, v in env.items())
    return f"{envline}\n\n{head}" + "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def _failure(row: dict) -> str:
    """What a row that did not train says about why (or '–')."""
    said = row.get("skipped") or row.get("error") or next(iter(row.get("notes") or []), "")
    if not said and row.get("traceback"):
        said = row["traceback"].strip().splitlines()[-1]
    return said.replace("|", "/")[:160] or "–"


def _ratio(a: dict, b: dict, key: str) -> str:
    return f"{a[key] / b[key]:.2f}×" if a.get(key) and b.get(key) else "–"


# ---------------------------------------------------------------- run

def run_alone(argv: list[str], log, environ: dict, timeout: float) -> int:
    """Run one row in a process group of its own; end the whole group afterwards (loader workers that outlive a
    process ended by its clock, or a row past its time). Returns its exit code, 124 when it ran out of time."""
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=environ, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = 124
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    return rc


def run(a: argparse.Namespace) -> None:
    """Every row asked for, in order, each in its own process, within ``--budget`` seconds from now."""
    deadline = time.time() + a.budget
    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    if not (a.tokenizer / "vocab.json").is_file():
        from dreambooth.models.tokenizer import find_tokenizer_dir

        a.tokenizer = find_tokenizer_dir(None, a.tokenizer)
    a.tokenizer = a.tokenizer.resolve()
    resolution = {f: (64 if a.tiny else r) for f, r in RESOLUTION.items()}
    setting = Setting(a.work.resolve(), a.tokenizer, a.scripts.resolve(),
                      {f: w if a.warmup is None else a.warmup for f, (w, _) in STEPS.items()},
                      {f: t if a.steps is None else a.steps for f, (_, t) in STEPS.items()}, resolution,
                      a.loader_workers, a.tiny)
    env = environment(a.kohya_site, setting.scripts)
    print(json.dumps(env), flush=True)
    models: dict[str, Path] = {}
    rows: list[dict] = []
    tails: list[str] = []
    results = a.out / "results.json"

    def save() -> None:
        results.write_text(json.dumps({"environment": env, "warmup": setting.warmup, "steps": setting.steps,
                                       "resolution": resolution, "budget_s": a.budget, "rows": rows}, indent=1))
        (a.out / "logs.txt").write_text("\n".join(tails))
        (a.out / "results.md").write_text(table(rows, env))

    for name in a.runs:
        runner, mode = kind_of(name)
        family = family_of(name)
        if time.time() > deadline - MIN_ROW_S - (0 if family in models else BUILD_S[family]):
            rows.append({"run": name, "skipped": f"budget: {deadline - time.time():.0f} s left"})
            save()
            continue
        started = time.time()
        if family not in models:
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "build", family, "--work",
                            str(setting.work), "--tokenizer", str(setting.tokenizer), *(["--tiny"] if a.tiny else [])],
                           check=True)
            models[family] = model_path(family, setting.work, a.tiny)
            env[f"build_{family}_s"] = round(time.time() - started, 1)
            print(f"built {family}: {models[family]} in {env[f'build_{family}_s']} s", flush=True)
        row_setting = setting
        if runner == "kohya" and a.kohya_resolution:  # the CPU check: the full-size SDXL at a small resolution
            row_setting = dataclasses.replace(setting, resolution={**resolution, "sdxl": a.kohya_resolution})
        res = row_setting.resolution[family]
        instance, klass = build_data(setting.work, family, res)
        folder = setting.work / f"{runner}-{mode}"
        shutil.rmtree(folder, ignore_errors=True)
        timing = setting.work / "timing" / f"{runner}-{mode}.json"
        timing.unlink(missing_ok=True)
        log = setting.work / "logs" / f"{runner}-{mode}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        try:
            argv = COMMANDS[runner](mode, row_setting, models[family], instance, klass, timing, folder)
        except Exception as exc:  # noqa: BLE001 (a mode this engine refuses is a row that says so)
            rows.append({"run": name, "rc": "config", "error": f"{type(exc).__name__}: {exc}"})
            print(json.dumps(rows[-1]), flush=True)
            save()
            continue
        environ = {**os.environ, "PYTHONUNBUFFERED": "1", "BENCH_EXIT_WHEN_TIMED": "1"}
        if runner == "kohya" and a.kohya_site:
            environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(a.kohya_site), environ.get("PYTHONPATH")]))
        timeout = max(10, min(a.timeout, deadline - time.time() - 5))
        launch = time.time()
        with open(log, "w") as handle:
            rc = run_alone(argv, handle, environ, timeout)
        wall = time.time() - launch
        data = json.loads(timing.read_text()) if timing.is_file() else {}
        row = summarize(name, data, launch, rc, wall, setting.steps[family], log)
        row.update(resolution=res, timeout_s=round(timeout))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
        if "traceback" in row:
            print(row["traceback"][-3000:], flush=True)
        lines = log.read_text(errors="replace").splitlines()
        tails.append(f"===== {name} rc={rc}\n" + "\n".join(line[-400:] for line in lines[-60:]))
        shutil.rmtree(folder, ignore_errors=True)  # the engine's working copy of an SDXL model is 7 GB
        save()
    save()
    print((a.out / "results.md").read_text(), flush=True)


# ---------------------------------------------------------------- prepare (here, before the GPU call)

def git_file(mirror: Path, ref: str, path: str) -> bytes:
    return subprocess.run(["git", "-C", str(mirror), "show", f"{ref}:{path}"], check=True,
                          capture_output=True).stdout


def prepare(a: argparse.Namespace) -> None:
    """Copy what runs of the fetched peers into build/ (ignored), write the tokenizer, download the wheels."""
    scripts = a.scripts
    kohya = scripts / "sd-scripts"
    shutil.rmtree(kohya, ignore_errors=True)
    commit = subprocess.run(["git", "-C", str(a.kohya_mirror), "rev-parse", a.kohya_ref], check=True,
                            capture_output=True, text=True).stdout.strip()
    listing = subprocess.run(["git", "-C", str(a.kohya_mirror), "ls-tree", "-r", "--name-only", commit, "--",
                              *KOHYA_FILES], check=True, capture_output=True, text=True).stdout.split()
    for path in listing:
        target = kohya / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(git_file(a.kohya_mirror, commit, path))
    (kohya / "SOURCE").write_text(f"kohya-ss/sd-scripts {commit}\n")
    reference = scripts / "reference"
    reference.mkdir(parents=True, exist_ok=True)
    for script in sorted({s for s, _ in DIFFUSERS_MODES.values()}):
        (reference / script).write_bytes(git_file(a.diffusers_mirror, a.diffusers_ref,
                                                  f"examples/dreambooth/{script}"))
    (reference / "SOURCE").write_text(f"huggingface/diffusers {a.diffusers_ref} examples/dreambooth\n")
    from dreambooth.models.tokenizer import find_tokenizer_dir

    tokenizer = find_tokenizer_dir(None, a.tokenizer)
    print(f"sd-scripts {commit}: {len(listing)} files; diffusers {a.diffusers_ref}; tokenizer {tokenizer}")
    if a.wheels:
        platform_flags = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
        for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"):
            platform_flags += ["--platform", tag]
        for folder, names in ((REPO / ".whl", WHEELS), (REPO / ".whl" / "kohya", KOHYA_WHEELS)):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *platform_flags, "-d", str(folder),
                            *names], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="copy the fetched peers' scripts into build/, write the tokenizer, wheels")
    p.add_argument("--kohya-mirror", type=Path, required=True, help="a git mirror of kohya-ss/sd-scripts")
    p.add_argument("--kohya-ref", default="48d368fa557731ad0488c07304dfeba8c07910eb")
    p.add_argument("--diffusers-mirror", type=Path, required=True, help="a git mirror of huggingface/diffusers")
    p.add_argument("--diffusers-ref", default="v0.40.0")
    p.add_argument("--wheels", action="store_true", help="also download WHEELS and KOHYA_WHEELS into .whl")
    r = sub.add_parser("run", help="every row, each in its own process")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--runs", nargs="+", default=RUNS)
    r.add_argument("--budget", type=float, default=530, help="seconds for everything, builds included")
    r.add_argument("--timeout", type=float, default=180, help="seconds per row at most")
    r.add_argument("--warmup", type=int, default=None, help="override the family's warm-up steps")
    r.add_argument("--steps", type=int, default=None, help="override the family's timed steps")
    r.add_argument("--work", type=Path, default=Path("/tmp/peers-bench"))
    r.add_argument("--kohya-site", type=Path, default=None, help="kohya's own packages, first on its PYTHONPATH")
    r.add_argument("--kohya-resolution", type=int, default=0, help="kohya's rows at this resolution (a CPU check)")
    r.add_argument("--loader-workers", type=int, default=4, help="the peers' loader worker processes")
    r.add_argument("--tiny", action="store_true", help="the tests' tiny models (not for kohya's rows), on the CPU")
    for q in (p, r):
        q.add_argument("--scripts", type=Path, default=BUILD, help="where sd-scripts/ and reference/ are")
        q.add_argument("--tokenizer", type=Path, default=BUILD / "tokenizer")
    b = sub.add_parser("build", help="one family's seeded model (run by `run`, in a process of its own)")
    b.add_argument("family", choices=sorted(RESOLUTION))
    b.add_argument("--work", type=Path, required=True)
    b.add_argument("--tokenizer", type=Path, required=True)
    b.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    if a.command == "build":
        print(build_model(a.family, a.work, a.tokenizer, a.tiny))
    else:
        (prepare if a.command == "prepare" else run)(a)


if __name__ == "__main__":
    main()
