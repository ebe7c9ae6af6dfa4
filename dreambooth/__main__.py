"""Command line: ``python -m dreambooth {train,new,convert,lora,options,demo,yaml,ui}``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import DreamBoothError


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run one command; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m dreambooth", description="DreamBooth training for Stable Diffusion 1.x."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train", help="train the model whose config.json is given (its folder is the model folder)")
    p.add_argument("config", type=Path)
    p.add_argument("--json", action="store_true", help="print events as JSON lines on stdout even on a terminal")
    p.add_argument(
        "--cancel-on-stdin-eof",
        action="store_true",
        help="cancel (after the current step) when standard input closes: a supervisor that dies stops its run",
    )

    p = commands.add_parser("new", help="write a model folder with a config.json of defaults")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--source", required=True,
                   help="SD 1.x, SD 2.x or SDXL .safetensors/.ckpt or diffusers folder, or a checkpoint under "
                        "--models-dir named as the web UI names it (title with or without hash, file name, name "
                        "without extension, hash)")
    p.add_argument("--models-dir", type=Path, default=Path("models"),
                   help="the web UI's models folder, whose Stable-diffusion/ checkpoints --source may name")
    p.add_argument("--instance-dir", required=True)
    p.add_argument("--instance-prompt", required=True)
    p.add_argument("--class-prompt", default="")
    p.add_argument("--steps", type=int, default=None)

    p = commands.add_parser("convert", help="single file -> diffusers folder, or diffusers folder -> single file")
    p.add_argument("source", type=Path)
    p.add_argument("destination", type=Path, help="a folder, or a file ending in .safetensors/.ckpt")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    p.add_argument("--tokenizer-dir", default="")
    p.add_argument("--config-dir", default="", help="diffusers config folder for single files of an unusual shape")

    p = commands.add_parser("lora", help="merge a LoRA into a checkpoint, or extract one from a fine-tune")
    lora = p.add_subparsers(dest="lora_command", required=True)
    p = lora.add_parser("merge", help="write BASE with LORA baked in as a new checkpoint")
    p.add_argument("base", type=Path, help="the checkpoint (.safetensors/.ckpt) or diffusers folder to merge into")
    p.add_argument("lora", type=Path, help="a LoRA file in kohya's layout (lora_unet_.../lora_te...)")
    p.add_argument("out", type=Path, help="the new checkpoint, ending in .safetensors or .ckpt")
    p.add_argument("--strength", type=float, default=1.0, help="how much of the LoRA to add (1.0: as trained)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    p.add_argument("--tokenizer-dir", default="")
    p.add_argument("--config-dir", default="", help="diffusers config folder for single files of an unusual shape")
    p = lora.add_parser("extract", help="write the difference between TUNED and its source BASE as a LoRA")
    p.add_argument("base", type=Path, help="the model the fine-tune was trained from")
    p.add_argument("tuned", type=Path, help="the fully fine-tuned model")
    p.add_argument("out", type=Path, help="the new LoRA file, ending in .safetensors")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--alpha", type=float, default=None, help="the LoRA's alpha (default: the rank)")
    p.add_argument("--layers", choices=("attention", "attention_ff", "attention_ff_conv"), default="attention",
                   help="which UNet layers the LoRA holds, as the 'lora_layers' option names them")
    p.add_argument("--text-encoder", action="store_true", help="also the text encoders' attention and MLP layers")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    p.add_argument("--tokenizer-dir", default="")
    p.add_argument("--config-dir", default="", help="diffusers config folder for single files of an unusual shape")

    commands.add_parser("options", help="print the reference of every config option (Markdown)")

    p = commands.add_parser("demo", help="train the built-in demo model and print what it learned")
    p.add_argument("--out", type=Path, default=Path("demo-output"))
    p.add_argument("--quick", action="store_true", help="a reduced run (fewer steps and samples)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print events as JSON lines on stdout even on a terminal")

    p = commands.add_parser(
        "yaml", help="write the web UI's .yaml beside a checkpoint of unusual shape (the demo model and its children)"
    )
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--tokenizer-dir", default="")

    p = commands.add_parser("ui", help="serve the DreamBooth tab without the web UI")
    p.add_argument("--models-dir", type=Path, default=Path("models"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7861)
    p.add_argument("--auth", default=None, help="user:password for the page and the API")

    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except DreamBoothError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .engine import run
    from .events import Events, TerminalProgress

    config = load_config(args.config)
    model_dir = args.config.resolve().parent
    if args.cancel_on_stdin_eof:
        _cancel_when_stdin_closes(model_dir)
    json_out = args.json or not sys.stdout.isatty()
    listener = (
        TerminalProgress(sys.stderr if json_out else sys.stdout) if (not json_out or sys.stderr.isatty()) else None
    )
    events = Events(model_dir / "logs" / "events.jsonl", sys.stdout if json_out else None, listener)
    try:
        run(config, model_dir, events)
    except DreamBoothError:
        return 1
    finally:
        events.close()
    return 0


def _cancel_when_stdin_closes(model_dir: Path) -> None:
    import threading

    from .events import CANCEL_FILE

    def watch() -> None:
        while sys.stdin.readline():
            pass
        (model_dir / CANCEL_FILE).touch()

    threading.Thread(target=watch, name="stdin-watch", daemon=True).start()


def _new(args: argparse.Namespace) -> int:
    from .config import Concept, TrainConfig, check_model_name, save_config
    from .supervisor import starting_settings

    source = _source_file(args.source, Path(args.models_dir) / "Stable-diffusion")
    if source is None:
        print(f"error: {args.source!r} is neither a file nor a checkpoint under {args.models_dir}/Stable-diffusion.",
              file=sys.stderr)
        return 1
    config = starting_settings(TrainConfig(
        model_name=check_model_name(args.model_dir.name),
        source_checkpoint=source,
        concepts=[
            Concept(
                instance_dir=args.instance_dir, instance_prompt=args.instance_prompt, class_prompt=args.class_prompt
            )
        ],
        prior_preservation=bool(args.class_prompt),
    ))
    if args.steps:
        config.max_steps = args.steps
    path = args.model_dir / "config.json"
    if path.exists():
        print(f"error: {path} exists already; edit it or pick another folder.", file=sys.stderr)
        return 1
    save_config(TrainConfig.from_dict(config.to_dict()), path)
    print(path)
    return 0


def _source_file(source: str, checkpoints_dir: Path) -> str | None:
    """An existing path as given, else the checkpoint the web UI's lookup would pick under ``checkpoints_dir``."""
    from .host.lookup import checkpoint_titles, closest_checkpoint

    if Path(source).exists():
        return str(source)
    found = closest_checkpoint(source, checkpoint_titles(checkpoints_dir))
    return str(found) if found is not None else None


def _convert(args: argparse.Namespace) -> int:
    from .models.convert import convert

    print(convert(args.source, args.destination, args.dtype, args.tokenizer_dir, args.config_dir))
    return 0


def _lora(args: argparse.Namespace) -> int:
    from .models.lora_tools import extract_lora, merge_lora

    if args.lora_command == "merge":
        merged = merge_lora(args.base, args.lora, args.out, args.strength, args.dtype, args.tokenizer_dir,
                            args.config_dir)
        if merged.note:
            print(f"warning: {merged.note}", file=sys.stderr)
        print(merged.path)
        return 0
    print(extract_lora(args.base, args.tuned, args.out, args.rank, args.alpha, args.layers, args.text_encoder,
                       args.dtype, args.tokenizer_dir, args.config_dir))
    return 0


def _options(args: argparse.Namespace) -> int:
    from .docs import options_reference

    print(options_reference())
    return 0


def _demo(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    import os

    from .demo.progress import DemoProgress
    from .demo.run import run_demo

    progress = DemoProgress(sys.stdout, json_lines=True if args.json else None)
    report = run_demo(args.out, quick=args.quick, seed=args.seed, progress=progress)
    if progress.json_lines:
        print(json.dumps({"event": "report", "seconds": round(report.seconds, 1), "grid": str(report.grid),
                          "rows": [dataclasses.asdict(r) for r in report.rows]}), flush=True)
        return 0
    print(report.table())
    print(f"sample grid: {report.grid}")
    print(f"{report.seconds:.0f} s on {os.cpu_count()} CPU threads here")
    return 0


def _yaml(args: argparse.Namespace) -> int:
    from .errors import ModelFormatError
    from .models.host_yaml import web_ui_cannot_build, write_host_yaml
    from .models.load import embedded_config

    configs = embedded_config(args.checkpoint)
    if configs is None:
        raise ModelFormatError(
            f"{args.checkpoint} carries no model configs in its header, so it has the stock SD 1.x shape (or is a "
            ".ckpt) and the web UI needs no .yaml for it.",
            "Only checkpoints of an unusual shape (the demo model, and what is trained from it) need one.",
        )
    problems = web_ui_cannot_build(configs)
    if problems:
        raise ModelFormatError(
            f"The web UI cannot build {args.checkpoint.name}: {'; '.join(problems)}. A .yaml would not change that.",
            "Use it with diffusers or this extension; for the web UI, train from an SD 1.x checkpoint or the demo "
            "model.",
        )
    print(write_host_yaml(args.checkpoint, configs, tokenizer_dir=args.tokenizer_dir))
    return 0


def _ui(args: argparse.Namespace) -> int:
    from .ui.app import serve

    serve(args.models_dir, args.host, args.port, args.auth)
    return 0


COMMANDS = {"train": _train, "new": _new, "convert": _convert, "lora": _lora, "options": _options, "demo": _demo,
            "yaml": _yaml, "ui": _ui}

if __name__ == "__main__":
    sys.exit(main())
