"""``run(config, model_dir, events)``: the one entry every front end calls.

Loads the source model, gathers the images, generates missing class images, caches what it may, trains,
and writes checkpoints; reports everything as events. Errors become one ``error`` event with a message and
what to do, then propagate.
"""

from __future__ import annotations

import contextlib
import errno
import math
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import torch

from . import __version__
from .config import TrainConfig, validate_for_training
from .data.buckets import assign_buckets, describe_buckets, latent_jobs
from .data.cache import ImageLatents, PromptEmbeddings
from .data.class_images import class_image_folder, existing_class_images, generate_class_images
from .data.dataset import Example, class_examples, instance_examples
from .data.images import check_images
from .errors import Cancelled, ConfigError, DatasetError, DiskFullError, DreamBoothError, OutOfMemoryAdvice
from .events import CANCEL_FILE, Events
from .models.export import SAVE_DTYPES, checkpoint_tensors, modelspec
from .models.load import LoadedModel, load_model
from .models.pipeline import inference_pipeline
from .sample import render_samples
from .train.loop import Run, RunResult, train, trained_text_encoders
from .train.optimizers import optimizer_spec
from .train.parallel import Parallel, from_environment, leave_process_group
from .train.speed.step_graph import enable_checkpointing
from .train.trained import trained_weights

T = TypeVar("T")

CLASS_BATCH = 4
PROMPT_BATCH = 8
"""Prompts encoded at a time for the embedding cache (each keeps every layer's hidden states while it runs)."""


def run(config: TrainConfig, model_dir: Path, events: Events) -> RunResult:
    """Train ``config`` with ``model_dir`` as the model's folder; see the module docstring."""
    model_dir = Path(model_dir)
    parallel = Parallel()
    try:
        device = resolve_device(config.device)
        parallel = from_environment(device.type)
        if not parallel.is_main:
            events = Events(on_event=_errors_to_stderr)  # process 0 reports for all
        return _run(config, model_dir, events, device, parallel)
    except Cancelled:
        events.emit("finished", step=0, cancelled=True, checkpoints=[])
        return RunResult(step=0, cancelled=True)
    except DreamBoothError as exc:
        events.emit("error", kind=type(exc).__name__, message=exc.message, advice=exc.advice)
        raise
    except torch.cuda.OutOfMemoryError as exc:
        advice = OutOfMemoryAdvice(
            "The GPU ran out of memory.",
            "Turn on gradient checkpointing and the fused optimizer step (optimizer_in_backward), use Adafactor (the "
            "least optimizer memory) or AdamW 8-bit, turn off text-encoder training, lower the batch size or the "
            "resolution, and close other programs that use the GPU.",
        )
        events.emit("error", kind="OutOfMemoryAdvice", message=advice.message, advice=advice.advice)
        raise advice from exc
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        full = DiskFullError(
            f"The disk is full: {exc.filename or model_dir} could not be written.",
            "Free some space and train again; it resumes from its last resume point.",
        )
        events.emit("error", kind="DiskFullError", message=full.message, advice=full.advice)
        raise full from exc
    finally:
        if parallel.is_main:
            (model_dir / CANCEL_FILE).unlink(missing_ok=True)
        leave_process_group()


def _run(config: TrainConfig, model_dir: Path, events: Events, device: torch.device, parallel: Parallel) -> RunResult:
    if parallel.active:
        device = torch.device(device.type, parallel.local_rank) if device.type == "cuda" else device
        if config.optimizer_in_backward:
            raise ConfigError(
                f"optimizer_in_backward cannot run on {parallel.world} processes: it updates each part of the UNet "
                "during the backward pass, before the other processes' gradients exist to be averaged.",
                "Turn optimizer_in_backward off for data-parallel training (8-bit AdamW still saves memory).",
            )
    for warning in validate_for_training(config):
        events.emit("warning", message=warning)
    weights_dtype = resolve_weights_dtype(config, device)
    autocast_dtype = None if weights_dtype == torch.bfloat16 else resolve_precision(config.mixed_precision, device)
    cancel_file = model_dir / CANCEL_FILE
    if parallel.is_main:
        model_dir.mkdir(parents=True, exist_ok=True)  # where a cancel request is dropped, from the start
        cancel_file.unlink(missing_ok=True)
        _remove_old_working_copy(model_dir, events)
    # before training, process 0 alone decides a cancel (the others may not have started yet)
    cancel_requested = cancel_file.exists if parallel.is_main else (lambda: False)

    min_side = min(64, config.resolution)
    instance = [e for concept in config.concepts for e in instance_examples(concept)]
    check_images([e.path for e in instance], min_side)
    instance = assign_buckets(instance, config.resolution, config.aspect_buckets)
    if config.aspect_buckets:
        events.emit("status", message=f"Aspect-ratio buckets (width x height): {describe_buckets(instance)}")
    trained = trained_weights(config)

    # Preparing moves each model to the device only while it works, so the device's peak is the largest phase's
    # (class images: every model in fp32; caching latents: the VAE; caching embeddings: the text encoders; training:
    # the UNet and whatever the steps run), never their sum.
    def prepare() -> tuple[LoadedModel, list[Example], ImageLatents]:
        events.emit("status", message=f"Loading {config.source_checkpoint}")
        loaded = load_model(
            config.source_checkpoint,
            cache_dir=model_dir / "cache",
            tokenizer_dir=config.tokenizer_dir,
            config_dir=config.model_config_dir,
            prediction_type=config.prediction_type,
        )
        components = loaded.components
        events.emit("status", message=f"{loaded.family.label} model, predicting {components.prediction_type}")
        if config.train_text_encoder_2 and "text_encoder_2" not in components.text_encoders:
            events.emit("warning", message=f"train_text_encoder_2 is on, but a {loaded.family.label} model has one "
                        "text encoder; it is ignored.")
        trained.check(components, trained_text_encoders(config, components))

        classes = _class_examples(config, loaded, model_dir, device, events, cancel_requested, min_side)
        if cancel_requested():
            raise Cancelled("Training was cancelled before it started.", "Press Train to start again.")

        latents = ImageLatents(
            components.vae,
            config.resolution,
            config.center_crop,
            config.cache_latents,
            model_dir / "cache" / "latents",
            loaded.source_id,
            device,
            min_side,
        )
        flips = (False, True) if config.hflip else (False,)
        with _on_device([components.vae], device, stay=not latents.use_cache):  # encodes every step when not cached
            latents.prepare(
                latent_jobs(instance, classes),
                flips,
                lambda done, total: events.emit("progress", phase="Caching latents", done=done, total=total),
            )
        return loaded, classes, latents

    loaded, classes, latents = _main_first(parallel, device, prepare)
    components = loaded.components
    if config.cache_latents and not config.center_crop:
        events.emit("warning", message="Random crops change every step, so latents are not cached.")
    prompts = PromptEmbeddings(
        loaded.family,
        components,
        device,
        config.cache_text_embeddings and not (config.train_text_encoder or config.train_text_encoder_2),
    )
    if prompts.use_cache:
        unique = list(dict.fromkeys(e.prompt for e in instance + classes))
        with _on_device(components.text_encoders.values(), device, stay=False):
            for start in range(0, len(unique), PROMPT_BATCH):
                prompts(unique[start : start + PROMPT_BATCH], trainable=False)

    # the parts the steps run arrive only now, after every cache is made and what made it has left the device
    text_encoders = trained_text_encoders(config, components) if config.text_encoder_stop > 0 else {}  # as train()
    resident = [] if prompts.use_cache else list(components.text_encoders)
    trained.place(components, text_encoders, device, weights_dtype, resident)
    apply_attention(components.unet, config.attention)
    if config.gradient_checkpointing:
        enable_checkpointing(components.unet)
        for name in trained_text_encoders(config, components):
            components.text_encoders[name].gradient_checkpointing_enable()
    helpers = _FrozenHelpers(
        ([components.vae] if latents.use_cache else []) + ([] if resident else list(components.text_encoders.values())),
        device,
    )

    output_dir = Path(config.output_dir) if config.output_dir else model_dir / default_output_folder(config)
    write = _save if config.method == "full" else _lora_writer()
    outcome: RunResult = train(
        Run(
            config=config,
            components=components,
            instance=instance,
            classes=classes,
            latents=latents,
            prompts=prompts,
            device=device,
            autocast_dtype=autocast_dtype,
            state_dir=model_dir / "state",
            total_steps=total_steps(config, len(instance), parallel.world),
            fingerprint={
                "source_id": loaded.source_id,
                "train_text_encoder": config.train_text_encoder,
                **({"train_text_encoder_2": True} if config.train_text_encoder_2 else {}),
                "optimizer": config.optimizer,
                "seed": config.seed,
                # buckets other than the square draw other batches (the square alone draws the order of old)
                **({"buckets": [list(b) for b in sorted({e.bucket for e in instance})]}
                   if {e.bucket for e in instance} != {(config.resolution, config.resolution)} else {}),
                **({"lora": [config.lora_rank, config.lora_alpha, config.lora_layers]} if config.method == "lora"
                   else {}),
                **({"lora_base_precision": "fp8"} if config.lora_base_precision == "fp8" else {}),
                # another process count draws other batches: its resume point does not continue this run
                **({"processes": parallel.world} if parallel.active else {}),
            },
            events=events,
            save_checkpoint=lambda step: write(config, loaded, output_dir, step, events),
            render_samples=lambda step: helpers.lent(lambda: _samples(config, loaded, model_dir, step)),
            cancel_requested=cancel_file.exists,
            parallel=parallel,
            trained=trained,
        )
    )
    events.emit(
        "finished", step=outcome.step, cancelled=outcome.cancelled, checkpoints=[str(p) for p in outcome.checkpoints]
    )
    return outcome


HOME = torch.device("cpu")
"""Where a model waits while the training device does not need it."""


@contextlib.contextmanager
def _on_device(modules: Iterable[torch.nn.Module], device: torch.device, stay: bool) -> Iterator[None]:
    """``modules`` on ``device`` for the block; back to :data:`HOME` after it unless ``stay``, their memory given
    back to the device (so each preparing phase's peak stands alone instead of adding to the next one's)."""
    modules = list(modules)
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        if not stay:
            for module in modules:
                module.to(HOME)
            if device.type == "cuda":
                torch.cuda.empty_cache()


class _FrozenHelpers:
    """The frozen models that the steps do not run (the VAE when latents are cached, the text encoders when their
    embeddings are): waiting at :data:`HOME`, lent to the training device for sample previews (about 0.8 GB of GPU
    memory at SD 1.5 size, 3.6 GB at SDXL's) and sent back after."""

    def __init__(self, modules: list[torch.nn.Module], device: torch.device) -> None:
        self.modules = modules
        self.device = device

    def lent(self, work: Callable[[], T]) -> T:
        """Run ``work`` with them on the training device, then send them back."""
        with _on_device(self.modules, self.device, stay=False):
            return work()


def _remove_old_working_copy(model_dir: Path, events: Events) -> None:
    """Delete the diffusers copy of the source (``working/``, stamped by its ``source.json``) that earlier versions
    kept in each model folder: the source is read directly now, and the copy held 2-7 GB."""
    working = model_dir / "working"
    if not (working / "source.json").is_file():
        return
    size = sum(f.stat().st_size for f in working.rglob("*") if f.is_file())
    shutil.rmtree(working, ignore_errors=True)
    events.emit("status", message=f"Removed {working} ({size / 2**30:.1f} GB), the copy of the source that earlier "
                "versions kept: the source checkpoint is read directly now.")


def _main_first(parallel: Parallel, device: torch.device, prepare: Callable[[], T]) -> T:
    """``prepare()`` in process 0 first (it writes the shared files: class images, latent cache),
    then in the others, which find them in place. If process 0 stops on the way (error or cancel), the others stop
    quietly with it instead of waiting for it."""
    if not parallel.active:
        return prepare()
    if parallel.is_main:
        stopped = True
        try:
            result = prepare()
            stopped = False
        finally:
            parallel.any(stopped, device)  # releases the others, telling them whether to go on
        return result
    if parallel.any(False, device):
        raise Cancelled("Process 0 stopped before training; this process stops with it.", "See process 0's log.")
    return prepare()


def total_steps(config: TrainConfig, num_instance: int, processes: int = 1) -> int:
    """Optimizer steps of the run: ``max_steps``, or enough for ``epochs`` passes over the instance images (each
    step takes ``batch_size`` × ``gradient_accumulation`` images in each of ``processes`` processes)."""
    if config.epochs:
        per_step = config.batch_size * config.gradient_accumulation * processes
        return max(1, math.ceil(config.epochs * num_instance / per_step))
    return config.max_steps


def _errors_to_stderr(event: dict) -> None:
    """What a process other than 0 says: only its errors (process 0 reports the run)."""
    if event["event"] == "error":
        print(f"error: {event['message']} {event.get('advice', '')}", file=sys.stderr, flush=True)


def resolve_device(choice: str) -> torch.device:
    """'auto' → the GPU when there is one; asking for 'cuda' without one is an error."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("'device' is cuda, but PyTorch finds no CUDA GPU.", "Pick 'auto' or 'cpu'.")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def resolve_precision(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full precision."""
    if choice == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[choice]


def resolve_weights_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """bf16 when asked, or for 'auto' on a GPU with bf16 where the optimizer runs on bf16 weights (its table entry,
    ``train/optimizers.py``); fp32 otherwise."""
    if config.weights_dtype == "bf16":
        return torch.bfloat16
    if config.weights_dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16 if optimizer_spec(config.optimizer).runs_on("flat") else torch.float32
    return torch.float32


def apply_attention(unet, choice: str) -> None:
    """Set the UNet's attention kernel: PyTorch SDPA, xformers, or the plain (eager) one."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if choice == "xformers":
        try:
            import xformers  # noqa: F401

            unet.enable_xformers_memory_efficient_attention()
        except Exception as exc:  # ImportError, or xformers built for another torch/CUDA
            raise ConfigError(
                f"'attention' is xformers, but xformers cannot be used here ({exc}).",
                "Pick 'sdpa' (as fast on current PyTorch).",
            ) from None
        return
    unet.set_attn_processor(AttnProcessor2_0() if choice == "sdpa" else AttnProcessor())


def _class_examples(
    config: TrainConfig,
    loaded: LoadedModel,
    model_dir: Path,
    device: torch.device,
    events: Events,
    cancelled,
    min_side: int,
) -> list[Example]:
    if not config.prior_preservation:
        return []
    examples: list[Example] = []
    for i, concept in enumerate(config.concepts):
        folder = class_image_folder(model_dir / "class_images", loaded.source_id, concept, config.resolution)
        paths = existing_class_images(concept, folder)
        missing = concept.num_class_images - len(paths)
        if missing > 0:
            events.emit("status", message=f"Generating {missing} class images for concepts[{i}]")
            # the loaded (fp32) models, all on the device while they generate, back home after
            with _on_device(loaded.components.models.values(), device, stay=False):
                paths += generate_class_images(
                    lambda: inference_pipeline(loaded.family, loaded.components),
                    concept,
                    folder,
                    missing,
                    config.resolution,
                    CLASS_BATCH,
                    device,
                    lambda done, total: events.emit("progress", phase="Generating class images", done=done,
                                                    total=total),
                    cancelled,
                )
        if concept.num_class_images:
            paths = paths[: concept.num_class_images]
        if not paths:
            raise DatasetError(
                f"concepts[{i}] has no class images and 'num_class_images' is 0.",
                "Set 'Class images' above 0 or turn prior preservation off.",
            )
        check_images(paths, min_side)
        examples += class_examples(concept, paths)
    return examples


def default_output_folder(config: TrainConfig) -> str:
    """The model folder's sub-folder its files go to when ``output_dir`` is empty."""
    return "loras" if config.method == "lora" else "checkpoints"


def _lora_writer() -> Callable[..., Path]:
    from .models.lora_export import save_lora

    return save_lora


def _save(config: TrainConfig, loaded: LoadedModel, output_dir: Path, step: int, events: Events) -> Path:
    """Write the checkpoint of ``step``; a model of non-stock shape gets its configs in the header and, first
    (the web UI lists the checkpoint as soon as it exists), the ``.yaml`` the web UI builds it from when its family
    needs one there."""
    from .models.export import config_metadata, save_checkpoint_for_hosts

    family, prediction = loaded.family, loaded.components.prediction_type
    path = output_dir / f"{config.model_name}_{step}.{config.save_format}"
    tensors = checkpoint_tensors(loaded.components, loaded.extra_tensors, SAVE_DTYPES[config.save_dtype], family)
    training = {
        "extension": f"dreambooth {__version__}",
        "base_model": Path(config.source_checkpoint).name,
        "base_model_id": loaded.source_id,
        "step": step,
        "instance_prompts": [c.instance_prompt for c in config.concepts],
        "class_prompts": [c.class_prompt for c in config.concepts] if config.prior_preservation else [],
        "learning_rate": config.learning_rate,
        "train_text_encoder": config.train_text_encoder,
        "resolution": config.resolution,
        "seed": config.seed,
    }
    metadata = modelspec(family, prediction, config.resolution, f"{config.model_name} (step {step})", training)
    metadata.update(config_metadata(loaded.diffusers_config))
    _yaml, note = save_checkpoint_for_hosts(path, tensors, metadata, family, loaded.diffusers_config, prediction,
                                            config.tokenizer_dir)
    if note:
        events.emit("warning", message=note)
    events.emit("checkpoint_saved", step=step, path=str(path))
    return path


def _samples(config: TrainConfig, loaded: LoadedModel, model_dir: Path, step: int) -> list[Path]:
    prompts = [p for c in config.concepts for p in c.sample_prompts] or [config.concepts[0].instance_prompt]
    return render_samples(
        loaded.family,
        loaded.components,
        prompts,
        config.sample_negative_prompt,
        config.sample_guidance_scale,
        config.sample_steps,
        config.sample_seed,
        config.resolution,
        model_dir / "samples",
        step,
    )
