"""The training loop: DreamBooth steps until the step budget is spent, saving along the way.

Every random draw of step ``s`` comes from generators seeded with (seed, s), and the data order is a pure
function of two counters, so a run resumed from a snapshot continues bit for bit where it stopped.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import TrainConfig
from ..data.cache import ImageLatents, PromptEmbeddings
from ..data.dataset import DataOrder, Example
from ..events import Events
from ..models.components import Components
from .loss import add_noise, dreambooth_loss, min_snr_weights
from .optim import build_lr_scheduler, build_optimizer, trainable
from .state import latest_snapshot, restore_snapshot, save_snapshot


@dataclass
class Run:
    """Everything the loop needs, prepared by the engine."""

    config: TrainConfig
    components: Components
    instance: list[Example]
    classes: list[Example]
    latents: ImageLatents
    prompts: PromptEmbeddings
    device: torch.device
    autocast_dtype: torch.dtype | None
    state_dir: Path
    total_steps: int
    fingerprint: dict
    events: Events
    save_checkpoint: Callable[[int], Path]
    render_samples: Callable[[int], list[Path]]
    cancel_requested: Callable[[], bool]


@dataclass
class Outcome:
    """How the loop ended."""

    step: int
    cancelled: bool
    checkpoints: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def step_seed(seed: int, step: int, micro: int) -> int:
    """The seed of every random draw in micro-batch ``micro`` of optimizer step ``step``."""
    return (seed * 1_000_003 + step * 1_009 + micro) % (2**63)


def train(run: Run) -> Outcome:
    """Train until ``run.total_steps`` optimizer steps are done or a cancel is requested."""
    cfg, unet, text_encoder = run.config, run.components.unet, run.components.text_encoder
    scheduler = run.components.scheduler
    train_te = cfg.train_text_encoder and cfg.text_encoder_stop > 0
    unet.requires_grad_(True).train()
    text_encoder.requires_grad_(train_te).train(train_te)
    groups = [{"params": trainable(unet.parameters()), "lr": cfg.learning_rate}]
    if train_te:
        groups.append({"params": trainable(text_encoder.parameters()), "lr": cfg.text_encoder_lr})
    optimizer = build_optimizer(cfg, groups)
    lr_scheduler = build_lr_scheduler(cfg, optimizer, run.total_steps)
    models = {"unet": unet, **({"text_encoder": text_encoder} if train_te else {})}

    order = DataOrder(len(run.instance), len(run.classes), cfg.seed)
    step = 0
    snapshot = latest_snapshot(run.state_dir)
    if snapshot is not None and snapshot.fingerprint == run.fingerprint and snapshot.step < run.total_steps:
        restore_snapshot(snapshot, models, optimizer, lr_scheduler)
        step = snapshot.step
        order = DataOrder(len(run.instance), len(run.classes), cfg.seed, **snapshot.data_order)
    elif snapshot is not None:
        run.events.emit(
            "warning",
            message=f"The resume point {snapshot.folder.name} belongs to other settings "
            "(model, steps or trained parts changed); starting from step 0.",
        )
    run.events.emit(
        "started",
        model=cfg.model_name,
        total_steps=run.total_steps,
        resumed_from=step,
        device=str(run.device),
        precision=str(run.autocast_dtype or torch.float32).removeprefix("torch."),
        optimizer=type(optimizer).__name__,
        attention=_attention_kernel(unet),
        gradient_checkpointing=bool(unet.is_gradient_checkpointing),
    )

    scaler = _grad_scaler(run)
    autocast = (
        torch.autocast(run.device.type, dtype=run.autocast_dtype) if run.autocast_dtype else contextlib.nullcontext()
    )
    te_stop_step = math.ceil(cfg.text_encoder_stop * run.total_steps)
    outcome = Outcome(step=step, cancelled=False)
    params = [p for g in groups for p in g["params"]]
    started, first_step = time.perf_counter(), step

    while step < run.total_steps:
        if train_te and step >= te_stop_step:
            train_te = False
            text_encoder.requires_grad_(False).eval()
        for micro in range(cfg.gradient_accumulation):
            generator = torch.Generator().manual_seed(step_seed(cfg.seed, step, micro))
            rng = random.Random(step_seed(cfg.seed, step, micro))
            instance_ids, class_ids = order.next_batch(cfg.batch_size)
            batch = [run.instance[i] for i in instance_ids] + [run.classes[i] for i in class_ids]
            flips = [cfg.hflip and rng.random() < 0.5 for _ in batch]
            latents = run.latents.sample([e.path for e in batch], flips, rng, generator)
            conditioning = run.prompts([e.prompt for e in batch], trainable=train_te)
            noised = add_noise(latents, scheduler, generator, cfg.offset_noise)
            with autocast:
                prediction = unet(noised.noisy_latents, noised.timesteps, conditioning).sample
            weights = (
                min_snr_weights(
                    noised.timesteps, scheduler.alphas_cumprod, cfg.min_snr_gamma, scheduler.config.prediction_type
                )
                if cfg.min_snr_gamma
                else None
            )
            loss = dreambooth_loss(prediction, noised.target, len(instance_ids), cfg.prior_loss_weight, weights)
            scaled = loss.total / cfg.gradient_accumulation
            (scaler.scale(scaled) if scaler else scaled).backward()
        if scaler:
            scaler.unscale_(optimizer)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg.max_grad_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        loss_value = float(loss.total.detach())
        outcome.losses.append(loss_value)
        elapsed = time.perf_counter() - started
        rate = (step - first_step) / elapsed if elapsed > 0 else 0.0
        run.events.emit(
            "step",
            step=step,
            total=run.total_steps,
            loss=loss_value,
            lr=lr_scheduler.get_last_lr()[0],
            it_per_s=rate,
            eta_s=(run.total_steps - step) / rate if rate else None,
            memory_mb=_memory_mb(run.device),
        )

        if (cfg.save_every and step % cfg.save_every == 0) or step == run.total_steps:
            outcome.checkpoints.append(run.save_checkpoint(step))
        if cfg.sample_every and step % cfg.sample_every == 0:
            run.events.emit("sample", step=step, paths=[str(p) for p in run.render_samples(step)])
        cancel = run.cancel_requested()
        if (cfg.state_every and step % cfg.state_every == 0) or (cancel and step < run.total_steps):
            path = save_snapshot(
                run.state_dir, step, models, optimizer, lr_scheduler, order.state(), run.fingerprint, cfg.keep_states
            )
            run.events.emit("state_saved", step=step, path=str(path))
        if cancel:
            outcome.cancelled = step < run.total_steps
            break
    outcome.step = step
    return outcome


def _attention_kernel(unet) -> str:
    kernels = {type(p).__name__ for p in unet.attn_processors.values()}
    return ",".join(sorted(kernels))


def _grad_scaler(run: Run):
    if run.autocast_dtype is not torch.float16 or run.device.type != "cuda":
        return None
    scaler_class = getattr(torch.amp, "GradScaler", None)
    return scaler_class("cuda") if scaler_class else torch.cuda.amp.GradScaler()


def _memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None
