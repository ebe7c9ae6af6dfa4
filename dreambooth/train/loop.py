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
from ..errors import Cancelled
from ..events import Events
from ..models.components import Components
from ..models.conditioning import Conditioning
from .loss import add_noise, dreambooth_loss, min_snr_weights
from .parallel import Parallel
from .speed.layout import (
    blocks_uncompiled,
    channels_last_group_norms,
    compile_blocks,
    graph_denoiser,
    plain_group_norms,
    to_channels_last,
    uncompile_blocks,
    uses_channels_last,
)
from .speed.scalars import DeviceScalars
from .speed.step_graph import StepGraph, capture_step, checkpointing_is_graph_safe
from .state import latest_snapshot, restore_snapshot, save_snapshot
from .trained import FullWeights
from .update import Updater


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
    """Autocast for the UNet's forward; None with bf16 weights (already 16-bit) or full precision."""
    state_dir: Path
    total_steps: int
    fingerprint: dict
    events: Events
    save_checkpoint: Callable[[int], Path]
    render_samples: Callable[[int], list[Path]]
    cancel_requested: Callable[[], bool]
    parallel: Parallel = field(default_factory=Parallel)
    """This process's share of a data-parallel run (one process: the whole run)."""
    trained: FullWeights = field(default_factory=FullWeights)
    """What trains: every weight, or LoRA adapters (``train/trained.py``)."""


@dataclass
class RunResult:
    """How a run ended: the last step, whether it was cancelled, the checkpoints it saved and every step's loss."""

    step: int
    cancelled: bool
    checkpoints: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


ROUNDING_STREAM = 99_991
"""The ``micro`` slot of :func:`step_seed` that seeds the global generator (stochastic rounding) each step."""


def step_seed(seed: int, step: int, micro: int) -> int:
    """The seed of every random draw in micro-batch ``micro`` of optimizer step ``step``."""
    return (seed * 1_000_003 + step * 1_009 + micro) % (2**63)


def train(run: Run) -> RunResult:
    """Train until ``run.total_steps`` optimizer steps are done or a cancel is requested."""
    cfg, unet = run.config, run.components.unet
    scheduler = run.components.scheduler
    text_encoders = trained_text_encoders(cfg, run.components) if cfg.text_encoder_stop > 0 else {}
    train_te = bool(text_encoders)
    run.trained.attach(run.components, text_encoders)
    channels_last = uses_channels_last(cfg.channels_last, run.device)
    if channels_last:
        to_channels_last(unet)
    weights_dtype = next(unet.parameters()).dtype
    updater = Updater(
        cfg,
        unet,
        [(run.components.text_encoders[name], lr) for name, lr in text_encoders.items()],
        run.total_steps,
        flat=weights_dtype == torch.bfloat16 or cfg.optimizer_in_backward,
        in_backward=cfg.optimizer_in_backward,
        grad_scaler=_grad_scaler(run),
        compile_optimizer=cfg.compile_optimizer,
        parallel=run.parallel,
    )
    models = run.trained.snapshot_parts(run.components, text_encoders)

    buckets = [e.bucket for e in run.instance]
    order = DataOrder(len(run.instance), len(run.classes), cfg.seed, buckets=buckets)
    step = 0
    snapshot = latest_snapshot(run.state_dir)
    if snapshot is not None and snapshot.fingerprint == run.fingerprint and snapshot.step < run.total_steps:
        updater.load_state_dict(restore_snapshot(snapshot, models))
        step = snapshot.step
        order = DataOrder(len(run.instance), len(run.classes), cfg.seed, **snapshot.data_order, buckets=buckets)
    elif snapshot is not None:
        run.events.emit(
            "warning",
            message=f"The resume point {snapshot.folder.name} belongs to other settings "
            "(model, optimizer, seed or trained parts changed); starting from step 0.",
        )

    def forward(sample: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        return unet(sample, timesteps, **conditioning.unet_kwargs()).sample

    unet_input = {
        "dtype": weights_dtype,
        "memory_format": torch.channels_last if channels_last else torch.contiguous_format,
    }
    autocast = (
        torch.autocast(run.device.type, dtype=run.autocast_dtype) if run.autocast_dtype else contextlib.nullcontext()
    )
    compile_start = time.perf_counter()
    compiled_blocks = _compile_unet(run, unet, unet_input, autocast, train_te) if cfg.compile_unet else 0
    compile_s = time.perf_counter() - compile_start if cfg.compile_unet else 0.0
    graphed = _graph_kind(run, train_te, weights_dtype, updater)
    if graphed and len(shapes := _batch_shapes(run)) > 1:
        graphed = None
        run.events.emit("warning", message=f"The instance images fall in {len(shapes)} aspect-ratio buckets and a "
                        "CUDA graph records one shape, so the UNet runs without CUDA graphs. Crop the photos to one "
                        "aspect ratio, or turn aspect_buckets off, to use them.")
    step_graph: StepGraph | None = None
    if graphed:
        try:
            if graphed == "step":
                step_graph = _capture_step(run, unet, updater, unet_input)
            else:
                forward = _capture(run, unet, updater, unet_input)
        except RuntimeError as exc:  # a kernel that cannot be recorded: run the UNet as usual
            graphed = None
            if updater.flat_optimizer is not None and updater.flat.grad is not None:
                updater.flat.zero_grad()
            run.events.emit("warning", message=f"CUDA graphs could not be recorded ({exc}); the UNet runs as usual.")
    run.events.emit(
        "started",
        model=cfg.model_name,
        total_steps=run.total_steps,
        resumed_from=step,
        device=str(run.device),
        weights=str(weights_dtype).removeprefix("torch."),
        precision=str(run.autocast_dtype or weights_dtype).removeprefix("torch."),
        optimizer=updater.kind,
        attention=_attention_kernel(unet),
        gradient_checkpointing=bool(unet.is_gradient_checkpointing),
        channels_last=_is_channels_last(unet),
        cuda_graphs=graphed,
        compiled_blocks=compiled_blocks,
        compile_s=round(compile_s, 1),
    )

    te_stop_step = math.ceil(cfg.text_encoder_stop * run.total_steps)
    outcome = RunResult(step=step, cancelled=False)
    losses, pending = DeviceScalars(), []
    started, first_step = time.perf_counter(), step

    def report() -> None:
        """Read the kept losses back (one sync) and emit their step events."""
        for (done, lr, rate), value in zip(pending, losses.drain()):
            outcome.losses.append(value)
            run.events.emit(
                "step",
                step=done,
                total=run.total_steps,
                loss=value,
                lr=lr,
                it_per_s=rate,
                eta_s=(run.total_steps - done) / rate if rate else None,
                memory_mb=_memory_mb(run.device),
            )
        pending.clear()

    while step < run.total_steps:
        if train_te and step >= te_stop_step:
            train_te = False
            for name in text_encoders:
                run.trained.freeze(run.components.text_encoders[name])
        torch.manual_seed(step_seed(cfg.seed, step, ROUNDING_STREAM))  # bf16 stochastic rounding draws from it
        for micro in range(cfg.gradient_accumulation):
            # the step's batches are drawn in one order everywhere; process r of w takes every w-th, from the r-th
            share = micro * run.parallel.world + run.parallel.rank
            generator = torch.Generator(device=run.device).manual_seed(step_seed(cfg.seed, step, share))
            rng = random.Random(step_seed(cfg.seed, step, share))
            for _ in range(run.parallel.rank):
                order.next_batch(cfg.batch_size)
            instance_ids, class_ids = order.next_batch(cfg.batch_size)
            for _ in range(run.parallel.world - run.parallel.rank - 1):
                order.next_batch(cfg.batch_size)
            batch = [run.instance[i] for i in instance_ids] + [run.classes[i] for i in class_ids]
            shape = batch[0].bucket  # one bucket per batch; the class images are cropped to it
            flips = [cfg.hflip and rng.random() < 0.5 for _ in batch]
            latents, geometries = run.latents.sample([e.path for e in batch], flips, shape, rng, generator)
            conditioning = run.prompts([e.prompt for e in batch], trainable=train_te, geometries=geometries)
            noised = add_noise(latents, scheduler, generator, cfg.offset_noise)
            weights = (
                min_snr_weights(
                    noised.timesteps, scheduler.alphas_cumprod, cfg.min_snr_gamma, scheduler.config.prediction_type
                )
                if cfg.min_snr_gamma
                else None
            )
            if step_graph is not None:  # forward, loss, backward and the UNet's update in one replay
                loss_total = step_graph(**_step_inputs(noised, conditioning, weights))
                continue
            with autocast:
                prediction = forward(
                    noised.noisy_latents.to(**unet_input), noised.timesteps, conditioning.to(weights_dtype)
                )
            loss_total = dreambooth_loss(
                prediction, noised.target, len(instance_ids), cfg.prior_loss_weight, weights
            ).total
            updater.backward(loss_total / cfg.gradient_accumulation)
        updater.step(unet_updated=step_graph is not None)
        step += 1

        if run.parallel.active:  # report the mean over the processes' shares
            loss_total = loss_total.detach().clone()
            run.parallel.average_([loss_total])
        losses.add(loss_total)
        elapsed = time.perf_counter() - started
        pending.append((step, updater.lr, (step - first_step) / elapsed if elapsed > 0 else 0.0))
        save = (cfg.save_every and step % cfg.save_every == 0) or step == run.total_steps
        sample = cfg.sample_every and step % cfg.sample_every == 0
        state_due = cfg.state_every and step % cfg.state_every == 0
        reporting = len(pending) >= cfg.log_every or save or sample or state_due
        if reporting:
            report()
        cancel = run.cancel_requested()
        if run.parallel.active:  # all processes stop at the same step: agreed where they all report (one wait)
            cancel = reporting and run.parallel.any(cancel, run.device)
        if cancel:
            report()
        main = run.parallel.is_main  # one process writes; every copy of the weights is the same
        snapshot_now = main and (state_due or (cancel and step < run.total_steps))
        if save and run.parallel.active and not run.parallel.identical(_weights_fingerprint(models)):
            run.events.emit("warning", message="The processes' copies of the weights have drifted apart (one of "
                            "them fell back from a compiled or recorded path?); process 0's copy is saved.")
        if save and main:
            outcome.checkpoints.append(run.save_checkpoint(step))
        if sample and main:
            with blocks_uncompiled(unet):  # previews run other shapes: no minutes of compiling for them
                paths = run.render_samples(step)
            run.events.emit("sample", step=step, paths=[str(p) for p in paths])
        if snapshot_now:
            path = save_snapshot(
                run.state_dir, step, models, updater.state_dict(), order.state(), run.fingerprint, cfg.keep_states
            )
            run.events.emit("state_saved", step=step, path=str(path))
        if cancel:
            outcome.cancelled = step < run.total_steps
            break
    report()
    outcome.step = step
    return outcome


def trained_text_encoders(cfg: TrainConfig, components: Components) -> dict[str, float]:
    """The text encoders a run of ``cfg`` trains (``Components`` attribute → learning rate): the first when
    ``train_text_encoder`` is on, the second (SDXL) when ``train_text_encoder_2`` is."""
    present = components.text_encoders
    wanted = {"text_encoder": (cfg.train_text_encoder, cfg.text_encoder_lr),
              "text_encoder_2": (cfg.train_text_encoder_2, cfg.text_encoder_2_lr)}
    return {name: lr for name, (on, lr) in wanted.items() if on and name in present}


def _weights_fingerprint(models: dict[str, torch.nn.Module]) -> torch.Tensor:
    """Sum and sum of squares of every trained weight, in float64: equal in two processes whose copies are equal."""
    values = [p.detach().double() for model in models.values() for p in model.parameters() if p.requires_grad]
    return torch.stack([torch.stack([v.sum(), v.square().sum()]) for v in values]).sum(dim=0)


def _graph_kind(run: Run, train_te: bool, weights_dtype: torch.dtype, updater: Updater) -> str | None:
    """What a CUDA graph can record in this run: the whole step ('step', with the optimizer step fused into the
    backward, where the optimizer's table entry says it records), the UNet's forward and backward ('denoiser'), or
    nothing (None)."""
    cfg, unet = run.config, run.components.unet
    if not (
        cfg.cuda_graphs
        and run.device.type == "cuda"
        and weights_dtype == torch.bfloat16
        and not train_te
        and run.autocast_dtype is None
        and cfg.gradient_accumulation == 1
    ):
        return None
    if updater.backward_step is not None:
        if not updater.spec.runs_on("step_graph"):
            run.events.emit("warning", message=f"The optimizer {updater.spec.name} cannot be recorded in a CUDA graph "
                            "with the whole step; the step runs as usual (cuda_graphs has no effect).")
            return None
        stashes_rng = unet.is_gradient_checkpointing and not checkpointing_is_graph_safe(unet)
        return None if stashes_rng else "step"
    return None if cfg.gradient_checkpointing else "denoiser"


def _compile_unet(run: Run, unet, unet_input: dict, autocast, train_te: bool) -> int:
    """Wrap the UNet's blocks for torch.compile and compile them now, with one forward and backward on a batch
    of each of this run's shapes (gradients to the input only: no weight sees them); returns the blocks compiled, or
    0 -- with a warning, and the UNet as it was -- when the compiler fails (no Triton, no C++ compiler, an
    unsupported op, a torch before 2.2)."""
    if not hasattr(torch.nn.Module, "compile"):
        run.events.emit("warning", message=f"compile_unet needs torch 2.2 or later (this is {torch.__version__}); "
                        "the UNet runs as usual.")
        return 0
    examples = [_example_batch(run, unet, unet_input, shape) for shape in _batch_shapes(run)]
    run.events.emit("status", message="Compiling the UNet (minutes on a first run)")
    checks: list = []
    try:
        if not run.parallel.active:  # several processes stop together, at the training loop's agreed cancel
            checks = _cancel_checks_between_blocks(unet, run.cancel_requested)
        count = compile_blocks(unet, shapes=len(examples))
        if _is_channels_last(unet):  # the NCHW UNet (the CPU) keeps the plain norms
            channels_last_group_norms(unet)
        for example in examples:  # each bucket's shape now, not minutes into training
            sample = example["sample"].detach().requires_grad_()
            # the text conditioning needs gradients as in training, or a step would recompile
            parts = _conditioning_of(example)
            conditioning = Conditioning.from_tensors(
                {k: v.detach().requires_grad_(train_te and k != "time_ids") for k, v in parts.items()}
            )
            with autocast:
                prediction = unet(sample, example["timesteps"], **conditioning.unet_kwargs()).sample
            torch.autograd.grad(prediction.float().square().mean(), sample)
    except Exception as exc:  # noqa: BLE001 -- any compiler failure: the uncompiled UNet still trains
        uncompile_blocks(unet)
        plain_group_norms(unet)
        if isinstance(exc, Cancelled):
            raise
        run.events.emit("warning", message=f"The UNet could not be compiled ({type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no message'}); it runs as usual.")
        return 0
    finally:
        for handle in checks:
            handle.remove()
    return count


def _cancel_checks_between_blocks(unet, cancel_requested: Callable[[], bool]) -> list:
    """Hooks that raise :class:`Cancelled` when a cancel is requested: before each of the UNet's down, mid and up
    blocks runs forward, and in backward when the gradient reaches each one's output (before its own backward
    runs). The compiler works through the blocks for minutes, so a Cancel takes effect at the next of these
    containers rather than after the whole compile. The hooks sit on the uncompiled containers, outside what the
    compiler traces; the caller removes them."""

    def check(*_) -> None:
        if cancel_requested():
            raise Cancelled("Training was cancelled while the UNet compiled.", "Press Train to start again.")

    def check_in_backward(_module, _args, output) -> None:
        first = output[0] if isinstance(output, tuple) else output
        if isinstance(first, torch.Tensor) and first.requires_grad:
            first.register_hook(check)

    containers = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    return [handle for block in containers if block is not None
            for handle in (block.register_forward_pre_hook(check), block.register_forward_hook(check_in_backward))]


def _capture_step(run: Run, unet, updater: Updater, unet_input: dict) -> StepGraph:
    """Record forward, loss, backward and the fused UNet update for this run's fixed batch shape."""
    cfg = run.config
    example = _example_batch(run, unet, unet_input, _batch_shapes(run)[0])
    example["target"] = torch.randn(example["sample"].shape, device=run.device)
    if cfg.min_snr_gamma:
        example["weights"] = torch.ones(example["sample"].shape[0], device=run.device)

    def loss_of(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        conditioning = Conditioning.from_tensors(inputs)
        prediction = unet(inputs["sample"], inputs["timesteps"], **conditioning.unet_kwargs()).sample
        return dreambooth_loss(
            prediction, inputs["target"], cfg.batch_size, cfg.prior_loss_weight, inputs.get("weights")
        ).total

    assert updater.backward_step is not None
    return capture_step(loss_of, updater.backward_step, example)


def _batch_shapes(run: Run) -> list[tuple[int, int]]:
    """The (height, width) of this run's batches: one per aspect-ratio bucket its instance images use."""
    return sorted({e.bucket or (run.config.resolution,) * 2 for e in run.instance})


def _example_batch(run: Run, unet, unet_input: dict, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Random UNet inputs of this run's batch size, dtypes and memory format for images of ``shape`` ((height,
    width) in pixels), for recording a graph or compiling."""
    cfg = run.config
    rows = cfg.batch_size * (2 if run.classes else 1)
    height, width = shape[0] // 8, shape[1] // 8
    return {
        "sample": torch.randn(rows, unet.config.in_channels, height, width, device=run.device).to(**unet_input),
        "timesteps": torch.randint(0, 1000, (rows,), device=run.device),
        **run.prompts([run.instance[0].prompt] * rows, trainable=False).to(unet_input["dtype"]).tensors(),
    }


def _conditioning_of(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return Conditioning.from_tensors(inputs).tensors()


def _step_inputs(noised, conditioning: Conditioning, weights: torch.Tensor | None) -> dict[str, torch.Tensor]:
    inputs = {
        "sample": noised.noisy_latents,
        "timesteps": noised.timesteps,
        **conditioning.tensors(),
        "target": noised.target,
    }
    if weights is not None:
        inputs["weights"] = weights
    return inputs


def _capture(run: Run, unet, updater: Updater, unet_input: dict) -> Callable:
    """Record the UNet's forward and backward for this run's fixed batch shape, then clear the warm-up gradients."""
    example = _example_batch(run, unet, unet_input, _batch_shapes(run)[0])
    names = list(_conditioning_of(example))
    graphed = graph_denoiser(unet, example["sample"], example["timesteps"], {n: example[n] for n in names})
    if updater.flat_optimizer is not None and updater.flat.grad is not None:
        updater.flat.zero_grad()

    def graphed_forward(sample: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        parts = conditioning.tensors()
        return graphed(sample, timesteps, *(parts[n] for n in names))

    return graphed_forward


def _is_channels_last(unet) -> bool:
    return unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


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
