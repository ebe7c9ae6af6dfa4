"""config.py: one declaration, validated JSON in and out, errors that name the field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dreambooth import config as config_module
from dreambooth.config import (
    CONFIG_VERSION,
    Concept,
    ConfigError,
    TrainConfig,
    check_model_name,
    load_config,
    option_specs,
    save_config,
)
from dreambooth.docs import options_reference

README = Path(__file__).resolve().parents[1] / "README.md"


def test_json_round_trip_keeps_every_field(tmp_path):
    original = TrainConfig(
        model_name="zwx",
        source_checkpoint="a.safetensors",
        learning_rate=3e-6,
        concepts=[Concept(instance_dir="i", instance_prompt="photo of zwx", sample_prompts=["x"])],
    )
    save_config(original, tmp_path / "config.json")
    assert load_config(tmp_path / "config.json") == original
    assert json.loads((tmp_path / "config.json").read_text())["concepts"][0]["sample_prompts"] == ["x"]


@pytest.mark.parametrize(
    "data,message",
    [
        ({"learning_rate": "fast"}, "'learning_rate' must be a number"),
        ({"max_steps": 2.5}, "'max_steps' must be a whole number"),
        ({"max_steps": 0}, "'max_steps' must be between 1 and 1e+06"),
        ({"optimizer": "sgd"}, "'optimizer' must be one of adamw, adamw_8bit, adafactor"),
        ({"hflip": "yes"}, "'hflip' must be true or false"),
        ({"lerning_rate": 1e-6}, "Unknown setting lerning_rate"),
        ({"concepts": [{"instance_dir": "x", "prompt": "y"}]}, "Unknown setting concepts[0].prompt"),
        ({"concepts": [{"num_class_images": -1}]}, "'concepts[0].num_class_images' must be between"),
        ({"concepts": "x"}, "'concepts' must be a list"),
        ({"version": CONFIG_VERSION + 1}, "reads up to"),
    ],
)
def test_bad_values_name_the_field_and_what_is_allowed(data, message):
    with pytest.raises(ConfigError) as error:
        TrainConfig.from_dict(data)
    assert message in str(error.value)


def test_an_unknown_key_lists_the_known_ones():
    with pytest.raises(ConfigError, match="Known settings: version, model_name"):
        TrainConfig.from_dict({"foo": 1})


def test_old_versions_are_migrated(monkeypatch):
    monkeypatch.setattr(config_module, "CONFIG_VERSION", 2)
    monkeypatch.setitem(config_module.MIGRATIONS, 1, lambda d: {"version": d["version"], "max_steps": d["steps"]})
    migrated = config_module.migrate({"version": 1, "steps": 7})
    assert migrated == {"version": 2, "max_steps": 7}


def test_a_broken_config_file_is_named(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=str(path).replace("\\", "\\\\")):
        load_config(path)


@pytest.mark.parametrize("name", ["../evil", "/abs", "a/b", "a\\b", "", ".hidden", "CON", "nul.txt", "x" * 65, "end."])
def test_model_names_that_escape_or_break_windows_are_refused(name):
    with pytest.raises(ConfigError):
        check_model_name(name)


def test_ordinary_model_names_pass():
    assert check_model_name("my-model_v1.2") == "my-model_v1.2"


def test_every_option_has_label_help_group_and_a_valid_default():
    for cls in (TrainConfig, Concept):
        for spec in option_specs(cls):
            assert spec.label and spec.help and spec.group, spec.name
            if spec.choices:
                assert spec.default in spec.choices, spec.name
            if spec.minimum is not None:
                assert spec.minimum <= spec.default <= spec.maximum, spec.name
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()


def test_readme_carries_the_generated_option_reference():
    assert options_reference() in README.read_text(encoding="utf-8"), (
        "README's option reference is stale: paste `python -m dreambooth options` into it"
    )


def test_cli_new_writes_a_valid_config(tmp_path):
    folder = tmp_path / "models" / "zwx"
    source = tmp_path / "m.safetensors"
    source.write_bytes(b"not read by new")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dreambooth",
            "new",
            str(folder),
            "--source",
            str(source),
            "--instance-dir",
            "photos",
            "--instance-prompt",
            "photo of zwx person",
            "--class-prompt",
            "photo of a person",
            "--steps",
            "400",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr
    config = load_config(folder / "config.json")
    assert config.model_name == "zwx" and config.max_steps == 400 and config.prior_preservation
    assert config.concepts[0].class_prompt == "photo of a person"


def test_help_texts_say_what_an_option_does_and_costs_not_what_a_benchmark_measured() -> None:
    """Measurements live in bench/README.md; a help text names no GPU, throughput or benchmark figure."""
    import dataclasses
    import re

    from dreambooth.config import Concept

    measured = re.compile(r"\b(H100|H200|A100|RTX|images/s|steps/s|TFLOP|MFU)\b|\d+(\.\d+)? against \d")
    for cls in (TrainConfig, Concept):
        for f in dataclasses.fields(cls):
            text = f.metadata.get("help", "")
            assert not measured.search(text), (f.name, text)


def _trainable(**options) -> TrainConfig:
    concept = Concept(instance_dir="i", instance_prompt="photo of zwx disc", class_prompt="photo of a disc")
    return TrainConfig(model_name="zwx", source_checkpoint="a.safetensors", concepts=[concept], **options)


def test_the_optimizer_choices_and_help_come_from_the_optimizer_table():
    from dreambooth.train.optimizers import OPTIMIZERS

    spec = next(s for s in option_specs(TrainConfig) if s.name == "optimizer")
    assert spec.choices == tuple(OPTIMIZERS)
    assert all(entry.help in spec.help for entry in OPTIMIZERS.values())


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit", "adafactor"])
def test_every_optimizer_is_accepted_on_bf16_weights_and_in_the_backward_pass(optimizer):
    config_module.validate_for_training(_trainable(optimizer=optimizer, weights_dtype="bf16",
                                                   optimizer_in_backward=True, gradient_checkpointing=True))


@pytest.mark.parametrize(
    "setting,path,named",
    [
        ({"optimizer_in_backward": True}, "backward", "turn 'optimizer_in_backward' off"),
        ({"weights_dtype": "bf16"}, "flat", "set 'weights_dtype' to fp32"),
        ({"weights_dtype": "fp32"}, "torch", "set 'weights_dtype' to bf16"),
        ({"train_text_encoder": True}, "torch", "set 'weights_dtype' to bf16"),
    ],
)
def test_a_path_the_optimizer_lacks_is_refused_naming_the_setting_and_the_optimizers_that_can(
    monkeypatch, setting, path, named
):
    import dataclasses

    from dreambooth.train import optimizers

    lacking = dataclasses.replace(optimizers.OPTIMIZERS["adafactor"],
                                  paths=optimizers.OPTIMIZERS["adafactor"].paths - {path})
    monkeypatch.setitem(optimizers.OPTIMIZERS, "adafactor", lacking)
    config_module.validate_for_training(_trainable(optimizer="adamw", **setting))
    with pytest.raises(ConfigError) as error:
        config_module.validate_for_training(_trainable(optimizer="adafactor", **setting))
    assert error.value.message.startswith("'optimizer' adafactor cannot run")
    assert error.value.advice == f"Pick adamw or adamw_8bit, or {named}."
    config_module.validate_for_training(_trainable(optimizer="adafactor"))  # 'auto' weights name no path
