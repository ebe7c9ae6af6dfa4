"""``run(config, model_dir, events)``: the one entry every front end calls.

Loads the source model, gathers the images, generates missing class images, caches what it may, trains,
and writes checkpoints; reports everything as events. Errors become one ``error`` event with a message and
what to do, then propagate.
"""

from __future__ import annotations

import errno
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from . import __version__
from .config import TrainConfig, validate_for_training
from .data.cache import ImageLatents, PromptEmbeddings
from .data.class_images import class_image_folder, existing_class_images, generate_class_images
from .data.dataset import Example, class_examples, instance_examples
from .data.images import check_images
from .errors import Cancelled, ConfigError, DatasetError, DiskFullError, DreamBoothError, OutOfMemoryAdvice
from .events import CANCEL_FILE, Events
from .models.export import SAVE_DTYPES, checkpoint_tensors, modelspec, save_checkpoint
from .models.load import LoadedModel, load_model
from .sample import inference_pipeline, render_samples
from .train.loop import Run, RunResult, train, trained_text_encoders
from .train.optimizers import optimizer_spec
from .train.parallel import Parallel, from_environment, leave_process_group
from .train.speed.step_graph import enable_checkpointing
from .train.trained import trained_weights

T = TypeVar("T")

CLASS_BATCH = 4


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
        cancel_file.unlink(missing_ok=True)
    # before training, process 0 alone decides a cancel (the others may not have started yet)
    cancel_requested = cancel_file.exists if parallel.is_main else (lambda: False)

    min_side = min(64, config.resolution)
    instance = [e for concept in config.concepts for e in instance_examples(concept)]
    check_images([e.path for e in instance], min_side)

    def prepare() -> tuple[LoadedModel, list[Example], ImageLatents]:
        events.emit("status", message=f"Loading {config.source_checkpoint}")
        loaded = load_model(
            config.source_checkpoint,
            model_dir / "working",
            model_dir / "cache",
            config.tokenizer_dir,
            config.model_config_dir,
            config.prediction_type,
        )
        components = loaded.components
        events.emit("status", message=f"{loaded.family.label} model, predicting {components.prediction_type}")
        if config.train_text_encoder_2 and "text_encoder_2" not in components.text_encoders:
            events.emit("warning", message=f"train_text_encoder_2 is on, but a {loaded.family.label} model has one "
                        "text encoder; it is ignored.")
        trained_weights(config).check(components, trained_text_encoders(config, components))
        for name, module in components.models.items():
            if name != "unet":  # the UNet goes in its training precision below (or in fp32 for class images)
                module.to(device)

        classes = _class_examples(config, loaded, model_dir, device, events, cancel_requested, min_side)
        if cancel_requested():
            raise Cancelled("Training was cancelled before it started.", "Press Train to start again.")

        # in its training precision where it is (on the GPU after generating class images, else still on the CPU);
        # it goes to the GPU once the latents and prompts are cached and the VAE and text encoders parked
        components.unet.to(dtype=weights_dtype)
        apply_attention(components.unet, config.attention)
        if config.gradient_checkpointing:
            enable_checkpointing(components.unet)
            for name in trained_text_encoders(config, components):
                components.text_encoders[name].gradient_checkpointing_enable()

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
        latents.prepare(
            [e.path for e in instance + classes],
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

    helpers = _FrozenHelpers(components, device)
    if device.type == "cuda" and latents.use_cache and prompts.use_cache:
        prompts([e.prompt for e in instance + classes], trainable=False)
        helpers.park()  # the step reads only cached latents and embeddings: free the GPU of VAE and text encoder
    components.unet.to(device)  # after the park: the UNet never shares the GPU with the VAE's caching or the encoders

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
                **({"lora": [config.lora_rank, config.lora_alpha, config.lora_layers]} if config.method == "lora"
                   else {}),
                # another process count draws other batches: its resume point does not continue this run
                **({"processes": parallel.world} if parallel.active else {}),
            },
            events=events,
            save_checkpoint=lambda step: write(config, loaded, output_dir, step, events),
            render_samples=lambda step: helpers.lent(lambda: _samples(config, loaded, model_dir, step)),
            cancel_requested=cancel_file.exists,
            parallel=parallel,
            trained=trained_weights(config),
        )
    )
    events.emit(
        "finished", step=outcome.step, cancelled=outcome.cancelled, checkpoints=[str(p) for p in outcome.checkpoints]
    )
    return outcome


class _FrozenHelpers:
    """The VAE and the frozen text encoders: parked in CPU memory while training needs none of them, lent back to
    the GPU for sample previews (about 0.8 GB of GPU memory at SD 1.5 size, 1.7 GB at SDXL's)."""

    def __init__(self, components, device: torch.device) -> None:
        self.modules = (components.vae, *components.text_encoders.values())
        self.device = device
        self.parked = False

    def park(self) -> None:
        """Move both to the CPU and give their GPU memory back."""
        for module in self.modules:
            module.to("cpu")
        torch.cuda.empty_cache()
        self.parked = True

    def lent(self, work: Callable[[], T]) -> T:
        """Run ``work`` with both on the training device, then park them again if they were parked."""
        if not self.parked:
            return work()
        for module in self.modules:
            module.to(self.device)
        try:
            return work()
        finally:
            self.park()


def _main_first(parallel: Parallel, device: torch.device, prepare: Callable[[], T]) -> T:
    """``prepare()`` in process 0 first (it writes the shared files: working copy, class images, latent cache),
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
            paths += generate_class_images(
                lambda: inference_pipeline(loaded.family, _unet_on(loaded.components, device)),
                concept,
                folder,
                missing,
                config.resolution,
                CLASS_BATCH,
                device,
                lambda done, total: events.emit("progress", phase="Generating class images", done=done, total=total),
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


def _unet_on(components, device: torch.device):
    """``components`` with the UNet moved to ``device`` as it is (fp32: the class-image pipeline runs no autocast)."""
    components.unet.to(device)
    return components


def _save(config: TrainConfig, loaded: LoadedModel, output_dir: Path, step: int, events: Events) -> Path:
    """Write the checkpoint of ``step``; a model of non-stock shape gets its configs in the header and, first
    (the web UI lists the checkpoint as soon as it exists), the ``.yaml`` the web UI builds it from when its family
    needs one there."""
    from .models.export import config_metadata
    from .models.host_yaml import write_host_yaml

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
    yaml_path = path.with_suffix(".yaml")
    yaml_existed = yaml_path.exists()
    problems = family.host_yaml_problems(loaded.diffusers_config, prediction)
    if problems:
        yaml_path.unlink(missing_ok=True)  # one an older version wrote would fail in the web UI
        events.emit("warning", message=f"{path.name} gets no .yaml: the web UI cannot build this model, because "
                    f"{'; '.join(problems)}. Diffusers and this extension load it.")
    elif problems is not None:
        write_host_yaml(path, loaded.diffusers_config, tokenizer_dir=config.tokenizer_dir)
    try:
        save_checkpoint(path, tensors, metadata)
    except BaseException:
        if not yaml_existed:  # no new yaml without its checkpoint
            yaml_path.unlink(missing_ok=True)
        raise
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
