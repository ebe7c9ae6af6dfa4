"""The end-to-end demo: teach the shipped shapes model a subject it never saw, and measure what DreamBooth did.

Subject: the two-tone star (:data:`shapes.SUBJECT_COLOURS`), 5 pictures, instance prompt "a zwx shape", class
prompt "a shape" with class images drawn by the base model. The same run is trained three times through the
engine (:func:`dreambooth.engine.run`): a full fine-tune with and without prior preservation, and a LoRA with prior
preservation (``method="lora"``, on the same class images; sampled as the base with the LoRA's layers added, as the
web UI applies ``<lora:name:1>``). Each model -- base, with prior, without, LoRA -- is sampled on the instance
prompt, a new context and the class prompt. :mod:`.evaluate` scores every picture.

The table: subject fidelity (instance-prompt samples that are the subject), recontextualisation (new-context
samples that are the subject *and* on the asked-for background), leakage (class-prompt samples that are the
subject) and the class drift: total-variation distances between the class-prompt samples' histogram of shapes
(and of colours) and the base model's, from 0 = same to 1 = disjoint. The base row's drift compares two sets
of base samples drawn from different seeds: the distance that chance alone gives.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import shapes
from .evaluate import Verdict, judge_batch
from .sampling import sample_images
from .settings import DemoSettings, settings, training_values

MODEL_DIR = Path(__file__).parent / "model"
DEMO_CHECKPOINT = MODEL_DIR / "shapes-sd1.safetensors"
DEMO_CONFIG_DIR = MODEL_DIR / "config"
INSTANCE_PROMPT = "a zwx shape"
CLASS_PROMPT = "a shape"
CONTEXT_PROMPT = "a zwx shape on a green background"
CONTEXT_BACKGROUND = "green"
TRAININGS = (("prior", True, "full"), ("no prior", False, "full"), ("lora prior", True, "lora"))
"""The demo's training runs: (row name, prior preservation, method)."""
PHASES = {"prior": "Training with prior preservation (class images first)",
          "no prior": "Training without prior preservation",
          "lora prior": "Training a LoRA with prior preservation (same class images)"}


@dataclass
class Row:
    """One model's scores."""

    model: str
    fidelity: float
    recontext: float
    leakage: float
    class_drift: float  # of the shapes
    colour_drift: float
    class_shapes: dict[str, int] = field(default_factory=dict)


@dataclass
class DemoReport:
    """What :func:`run_demo` measured and wrote."""

    rows: list[Row]
    checkpoints: dict[str, Path]
    losses: dict[str, list[float]]  # per training run, one loss per step
    grid: Path
    seconds: float
    settings: DemoSettings

    def row(self, model: str) -> Row:
        """The row of ``model`` ('base', 'prior', 'no prior', 'lora prior')."""
        return next(r for r in self.rows if r.model == model)

    def table(self) -> str:
        """The fidelity table in Markdown."""
        lines = ["| model | subject fidelity | recontextualisation | class leakage | class shape drift | "
                 "class colour drift | class-prompt shapes |",
                 "|---|---|---|---|---|---|---|"]
        for r in self.rows:
            shapes_text = ", ".join(f"{k} {v}" for k, v in sorted(r.class_shapes.items()))
            lines.append(f"| {r.model} | {r.fidelity:.0%} | {r.recontext:.0%} | {r.leakage:.0%} | "
                         f"{r.class_drift:.2f} | {r.colour_drift:.2f} | {shapes_text} |")
        return "\n".join(lines)


def run_demo(out_dir: Path, quick: bool = False, seed: int = 0, checkpoint: Path = DEMO_CHECKPOINT,
             config_dir: Path = DEMO_CONFIG_DIR, events: Any = None,
             overrides: dict[str, Any] | None = None, tokenizer_dir: str = "",
             progress: Callable[[dict[str, Any]], None] | None = None) -> DemoReport:
    """Write the instance images, train with and without prior preservation and a LoRA with it, score the base
    and the three, draw a grid.

    ``overrides`` replaces fields of :class:`DemoSettings` (for measuring other settings). ``progress`` gets every
    event as it happens, tagged with its phase (:class:`.progress.DemoProgress` draws them).
    """
    from ..engine import run as run_engine
    from ..events import Events
    from ..models.load import load_model
    from .progress import PHASE

    started = time.time()
    phase = ""

    def report(event: dict[str, Any]) -> None:
        if progress is not None:
            progress({**event, PHASE: phase})

    def begin(name: str) -> None:
        nonlocal phase
        phase = name
        report({"event": "phase", "time": round(time.time(), 3)})

    options = dataclasses.replace(settings(quick), **(overrides or {}))
    out_dir = Path(out_dir)
    instance_dir = write_instance_images(out_dir / "instance", seed, options.captions)
    checkpoints, losses = {}, {}
    class_dir = ""  # the first run's class images, which the LoRA run reuses
    for name, prior, method in TRAININGS:
        begin(PHASES[name])
        model_name = "shapes-zwx-" + name.replace(" ", "")
        config = demo_config(model_name, instance_dir, checkpoint, config_dir, options, prior, seed, method)
        config.tokenizer_dir = tokenizer_dir
        if prior and class_dir:
            config.concepts[0].class_dir = class_dir
        model_dir = out_dir / model_name
        log = events or Events(log_path=model_dir / "logs" / "events.jsonl", on_event=report)
        result = run_engine(config, model_dir, log)
        checkpoints[name] = result.checkpoints[-1]
        losses[name] = list(result.losses)
        if prior and not class_dir:
            class_dir = str(next((model_dir / "class_images").iterdir()))
    begin("Sampling and judging")
    rows, pictures = [], {}

    def load(path: Path) -> Any:  # a LoadedModel
        return load_model(path, cache_dir=out_dir / "eval" / "cache", tokenizer_dir=tokenizer_dir,
                          config_dir=str(config_dir))

    base = load(checkpoint).components
    models = {"base": base}
    for name, _prior, method in TRAININGS:
        loaded = load(checkpoint if method == "lora" else checkpoints[name])
        if method == "lora":
            add_lora(loaded, checkpoints[name])
        models[name] = loaded.components
    prompts = (INSTANCE_PROMPT, CONTEXT_PROMPT, CLASS_PROMPT)
    batches = 1 + len(models) * len(prompts)

    def sampled(done: int) -> None:
        report({"event": "progress", "time": round(time.time(), 3), "phase": "sample batches", "done": done,
                "total": batches})

    # the drift's noise floor: two sets of base samples differ by chance alone; the base row reports that distance
    base_class = judge_batch(_sample(base, CLASS_PROMPT, options, seed + 200_000))
    sampled(1)
    for name, components in models.items():
        samples = {}
        for prompt in prompts:
            samples[prompt] = _sample(components, prompt, options, seed + 100_000)
            sampled(2 + len(pictures) * len(prompts) + len(samples) - 1)
        verdicts = {prompt: judge_batch(images) for prompt, images in samples.items()}
        rows.append(score(name, verdicts, base_class))
        pictures[name] = samples
    grid = write_grid(pictures, out_dir / "demo_grid.png")
    seconds = time.time() - started
    report({"event": "demo_finished", "time": round(time.time(), 3), "seconds": round(seconds, 1)})
    return DemoReport(rows, checkpoints, losses, grid, seconds, options)


def demo_config(model_name: str, instance_dir: Path, checkpoint: Path, config_dir: Path, options: DemoSettings,
                prior: bool, seed: int, method: str = "full"):  # -> TrainConfig
    """The engine's config for one demo training run: a full fine-tune, or (``method="lora"``) a LoRA."""
    from ..config import Concept, TrainConfig

    instance_prompt = "[filewords]" if options.captions else INSTANCE_PROMPT
    concept = Concept(instance_dir=str(instance_dir), instance_prompt=instance_prompt, class_prompt=CLASS_PROMPT,
                      num_class_images=options.num_class_images, class_guidance_scale=options.guidance,
                      class_infer_steps=options.class_steps, class_seed=seed)
    values = dict(
        model_name=model_name, source_checkpoint=str(checkpoint), model_config_dir=str(config_dir),
        concepts=[concept], resolution=shapes.IMAGE_SIZE, **training_values(options, method), prior_preservation=prior,
        save_every=0, device=options.device, mixed_precision="no", seed=seed)
    return TrainConfig(**{**values, **options.engine_options})


def add_lora(loaded: Any, lora: Path) -> None:
    """Add every layer of the LoRA file ``lora`` to its weight in ``loaded`` (a :class:`LoadedModel`) at strength 1:
    ``W + (alpha / rank) · up @ down``, the model the web UI samples with ``<lora:name:1>`` (as ``lora merge``)."""
    from ..models.lora_file import read_lora
    from ..models.lora_tools import matched_deltas

    layers, _header = read_lora(lora)
    with torch.no_grad():
        for target, delta in matched_deltas(loaded, layers, lora):
            target.weight.add_(delta.to(target.weight.dtype))


def write_instance_images(folder: Path, seed: int, captions: bool = True) -> Path:
    """The 5 pictures of the subject, as PNG files; with ``captions``, a .txt beside each naming its background
    ("a zwx shape on a white background"), so the background stays a separate, promptable thing."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed + 7)
    scenes = shapes.sample_subject_scenes(5, generator)
    images = shapes.to_uint8(shapes.render(scenes)).numpy()
    for i, (image, background) in enumerate(zip(images, scenes.background)):
        Image.fromarray(image).save(folder / f"zwx_{i}.png")
        if captions:
            (folder / f"zwx_{i}.txt").write_text(f"{INSTANCE_PROMPT} on a {background} background\n")
    return folder


def score(model: str, verdicts: dict[str, list[Verdict]], base_class: list[Verdict]) -> Row:
    """One table row from the verdicts on the three prompts."""
    instance, context, klass = verdicts[INSTANCE_PROMPT], verdicts[CONTEXT_PROMPT], verdicts[CLASS_PROMPT]
    return Row(
        model=model,
        fidelity=_share(v.is_subject for v in instance),
        recontext=_share(v.is_subject and v.background == CONTEXT_BACKGROUND for v in context),
        leakage=_share(v.is_subject for v in klass),
        class_drift=class_drift(klass, base_class, "shape"),
        colour_drift=class_drift(klass, base_class, "colour"),
        class_shapes=dict(Counter(v.shape for v in klass)),
    )


def class_drift(samples: list[Verdict], reference: list[Verdict], attribute: str) -> float:
    """Total-variation distance between the histograms of ``attribute`` ('shape', 'colour') of two verdict sets."""
    a = Counter(getattr(v, attribute) for v in samples)
    b = Counter(getattr(v, attribute) for v in reference)
    keys = set(a) | set(b)
    return 0.5 * sum(abs(a[k] / max(len(samples), 1) - b[k] / max(len(reference), 1)) for k in keys)


def write_grid(pictures: dict[str, dict[str, np.ndarray]], path: Path, per_prompt: int = 6) -> Path:
    """One row per model: ``per_prompt`` samples of each prompt side by side, 2x enlarged."""
    from PIL import Image

    rows = []
    for samples in pictures.values():
        tiles = [image for images in samples.values() for image in images[:per_prompt]]
        rows.append(np.concatenate(tiles, axis=1))
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    grid = grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _sample(components: Any, prompt: str, options: DemoSettings, seed: int) -> np.ndarray:
    for model in components.models.values():
        model.eval()
    return sample_images(components, [prompt] * options.samples, seed=seed, steps=options.sample_steps,
                         guidance=options.guidance)


def _share(flags) -> float:
    flags = list(flags)
    return sum(flags) / max(len(flags), 1)


def main(argv: list[str] | None = None) -> None:
    """``python -m dreambooth.demo.run OUT [--quick] [--seed N]``: run the demo and print its table."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dreambooth.demo.run")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT)
    parser.add_argument("--config-dir", type=Path, default=DEMO_CONFIG_DIR)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override a DemoSettings field, e.g. --set steps=400")
    parser.add_argument("--json", action="store_true", help="also print the report as one JSON line")
    parser.add_argument("--tokenizer-dir", default="", help="folder with the CLIP vocab.json and merges.txt")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.set)
    report = run_demo(args.out_dir, args.quick, args.seed, args.checkpoint, args.config_dir,
                      events=_QuietEvents(), overrides=overrides, tokenizer_dir=args.tokenizer_dir)
    print(report.table())
    if args.json:
        print(json.dumps({"seed": args.seed, "settings": dataclasses.asdict(report.settings),
                          "seconds": round(report.seconds, 1), "rows": [dataclasses.asdict(r) for r in report.rows]}))
    print(f"\ncheckpoints: {', '.join(str(p) for p in report.checkpoints.values())}\ngrid: {report.grid}\n"
          f"seconds: {report.seconds:.1f}")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["steps=400", "captions=true"]`` → ``{"steps": 400, "captions": True}`` (values are JSON)."""
    return {name: json.loads(value) for name, _, value in (item.partition("=") for item in items)}


class _QuietEvents:
    """Events sink that keeps nothing (the demo prints its own summary)."""

    def emit(self, kind: str, /, **fields: Any) -> dict[str, Any]:
        return {"event": kind, **fields}

    def close(self) -> None:
        pass


if __name__ == "__main__":
    main()
