"""The tab is generated from config.py: every option appears with its declaration, and a form round-trips."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
from supervisor_fakes import RecordingHost, write_fake_engine

from dreambooth.config import Concept, TrainConfig, option_specs
from dreambooth.errors import ConfigError
from dreambooth.host.standalone import StandaloneHost
from dreambooth.supervisor import Supervisor
from dreambooth.train.optimizers import OPTIMIZERS
from dreambooth.ui.features import unavailable_choices
from dreambooth.ui.form import (
    MAX_CONCEPTS,
    config_to_values,
    form_fields,
    values_to_config,
)
from dreambooth.ui.plot import loss_lr_svg
from dreambooth.ui.progress import progress_html
from dreambooth.ui.tab import DreamBoothTab, build_tab, element_id


@pytest.fixture
def models(tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    (folder / "Stable-diffusion" / "sub").mkdir(parents=True)
    (folder / "Stable-diffusion" / "base.safetensors").write_bytes(b"base")
    (folder / "Stable-diffusion" / "sub" / "other.ckpt").write_bytes(b"other")
    return folder


@pytest.fixture
def tab(models: Path, tmp_path: Path) -> DreamBoothTab:
    host = RecordingHost(models)
    supervisor = Supervisor(
        host,
        models / "dreambooth",
        models / "Stable-diffusion",
        launcher=write_fake_engine(tmp_path),
        cancel_timeout=5.0,
        poll_interval=0.02,
    )
    blocks = build_tab(supervisor, host)
    return blocks.dreambooth_tab


def different_value(spec, rng: random.Random, available: dict[str, dict[str, str]]):
    """A valid value of the option that is not its default."""
    if spec.type == "bool":
        return not spec.default
    if spec.choices:
        return next(c for c in spec.choices if c != spec.default and c not in available.get(spec.name, {}))
    if spec.type == "int":
        lo, hi = int(spec.minimum), int(min(spec.maximum, spec.minimum + 10_000))
        candidates = (rng.randint(lo, hi) for _ in range(1000))
        return next(v for v in candidates if v != spec.default and (spec.name != "resolution" or v % 8 == 0))
    if spec.type == "float":
        value = round(rng.uniform(spec.minimum, spec.maximum), 6)
        return value if value != spec.default else spec.minimum
    if spec.type == "list[str]":
        return [f"{spec.name} one", f"{spec.name} two"]
    return f"{spec.name} text ✓"


def non_default_config(concepts: int = 2) -> TrainConfig:
    rng = random.Random(0)
    missing = unavailable_choices()
    data = {
        spec.name: different_value(spec, rng, missing)
        for spec in option_specs(TrainConfig)
        if spec.name not in ("concepts", "version")
    }
    data["model_name"] = "zwx-model"
    data["concepts"] = [
        {spec.name: different_value(spec, rng, missing) for spec in option_specs(Concept)} for _ in range(concepts)
    ]
    config = TrainConfig.from_dict(data)
    for spec in option_specs(TrainConfig):
        if spec.name not in ("concepts", "version"):
            assert getattr(config, spec.name) != spec.default, spec.name
    return config


def test_every_option_has_one_component_with_its_declaration(tab: DreamBoothTab) -> None:
    specs = [s for s in option_specs(TrainConfig) if s.name != "concepts"]
    by_id = {c.elem_id: c for c in tab.components}
    assert len(by_id) == len(tab.components) == len(specs) + MAX_CONCEPTS * len(option_specs(Concept))
    slots = [(s, None) for s in specs] + [(s, i) for i in range(MAX_CONCEPTS) for s in option_specs(Concept)]
    for spec, slot in slots:
        component = by_id[element_id(spec.name if slot is None else f"concepts[{slot}].{spec.name}")]
        assert component.label == spec.label
        assert component.info.startswith(spec.help)
        if spec.type == "bool":
            assert isinstance(component, gr.Checkbox) and component.value is spec.default
        elif spec.choices:
            assert isinstance(component, gr.Dropdown) and component.value == spec.default
            shown = [c[0] if isinstance(c, (tuple, list)) else c for c in component.choices]
            assert shown == [c for c in spec.choices if c not in tab.unavailable.get(spec.name, {})]
        elif spec.type in ("int", "float"):
            assert isinstance(component, gr.Number) and component.value == spec.default
            assert (component.minimum, component.maximum) == (spec.minimum, spec.maximum)
        elif spec.type == "list[str]":
            assert isinstance(component, gr.Textbox) and component.value == "\n".join(spec.default)
        else:
            assert isinstance(component, gr.Textbox) and component.value == spec.default


def test_options_are_grouped_in_panels_named_after_their_group(tab: DreamBoothTab) -> None:
    accordions = {}
    for block in tab.blocks.blocks.values():
        if isinstance(block, gr.Accordion):
            accordions[block.label] = block
    groups = {s.group for s in option_specs(TrainConfig)} - {"Concept"}
    assert groups <= set(accordions)
    assert {f"Concept {i + 1}" for i in range(MAX_CONCEPTS)} <= set(accordions)


def test_a_missing_optional_package_disables_its_choice_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, models: Path, tmp_path: Path
) -> None:
    missing = unavailable_choices(installed=lambda package: package != "xformers")
    assert list(missing) == ["attention"] and "xformers is not installed" in missing["attention"]["xformers"]
    monkeypatch.setattr("dreambooth.ui.tab.unavailable_choices", lambda: missing)
    host = RecordingHost(models)
    supervisor = Supervisor(host, models / "dreambooth", models / "Stable-diffusion")
    tab = build_tab(supervisor, host).dreambooth_tab
    attention = next(c for c in tab.components if c.elem_id == "dreambooth_attention")
    shown = [c[0] if isinstance(c, (tuple, list)) else c for c in attention.choices]
    assert "xformers" not in shown and "sdpa" in shown
    assert "xformers (xformers is not installed" in attention.info
    supervisor.create_model("zwx", "base.safetensors")
    config = supervisor.load_config("zwx")
    config.attention = "xformers"
    supervisor.save_config(config)
    filled = tab.open_model("zwx")
    assert filled[1 + tab._index("attention")] == "sdpa"
    assert "unavailable here" in filled[-1]
    values = list(config_to_values(config, tab.fields)[0]) + [1]
    with pytest.raises(ConfigError, match="xformers"):
        tab.form_config(tuple(values))


def test_the_optimizer_dropdown_offers_the_optimizer_tables_entries_runnable_here(models: Path) -> None:
    host = RecordingHost(models)
    tab = build_tab(Supervisor(host, models / "dreambooth", models / "Stable-diffusion"), host).dreambooth_tab
    optimizer = next(c for c in tab.components if c.elem_id == "dreambooth_optimizer")
    shown = [c[0] if isinstance(c, (tuple, list)) else c for c in optimizer.choices]
    assert shown == list(OPTIMIZERS) == ["adamw", "adamw_8bit", "adafactor"]
    assert all(spec.help in optimizer.info for spec in OPTIMIZERS.values())
    # AdamW 8-bit needs bitsandbytes on fp32 weights only: without it, bf16 weights still run it
    assert "optimizer" not in unavailable_choices(installed=lambda package: package != "bitsandbytes")
    only_torch = {"x": dataclasses.replace(OPTIMIZERS["adamw_8bit"], name="x", paths=frozenset({"torch"}))}
    missing = unavailable_choices(installed=lambda package: package != "bitsandbytes", optimizers=only_torch)
    assert "bitsandbytes is not installed" in missing["optimizer"]["x"]

def test_adamw_8bit_is_offered_without_bitsandbytes_and_needs_it_only_with_fp32_weights(
    monkeypatch: pytest.MonkeyPatch, models: Path
) -> None:
    """Forge on a machine without CUDA has no bitsandbytes: the extension's own 8-bit AdamW (bf16 weights, any
    device) stays selectable, and the form says what to change only where bitsandbytes' would be needed."""
    no_bnb = lambda package: package != "bitsandbytes"  # noqa: E731
    monkeypatch.setattr("dreambooth.ui.tab.unavailable_choices", lambda: unavailable_choices(installed=no_bnb))
    monkeypatch.setattr("dreambooth.ui.features._installed", no_bnb)
    monkeypatch.setattr("dreambooth.ui.features._gpu_has_bf16", lambda: False, raising=False)
    host = RecordingHost(models)
    supervisor = Supervisor(host, models / "dreambooth", models / "Stable-diffusion")
    tab = build_tab(supervisor, host).dreambooth_tab
    optimizer = next(c for c in tab.components if c.elem_id == "dreambooth_optimizer")
    assert "adamw_8bit" in [c[0] if isinstance(c, (tuple, list)) else c for c in optimizer.choices]
    supervisor.create_model("zwx", "base.safetensors")
    config = supervisor.load_config("zwx")
    config.optimizer, config.weights_dtype = "adamw_8bit", "bf16"
    supervisor.save_config(config)
    filled = tab.open_model("zwx")
    assert filled[1 + tab._index("optimizer")] == "adamw_8bit" and "unavailable" not in filled[-1]
    values = list(config_to_values(config, tab.fields)[0]) + [1]
    assert tab.form_config(tuple(values)).optimizer == "adamw_8bit"
    for weights in ("fp32", "auto"):  # 'auto' is fp32 where no CUDA GPU with bf16 trains
        config.weights_dtype = weights
        values = list(config_to_values(config, tab.fields)[0]) + [1]
        with pytest.raises(ConfigError, match="bitsandbytes.*bf16"):
            tab.form_config(tuple(values))
    config.optimizer_in_backward = True  # the fused step is the extension's own kernel too
    values = list(config_to_values(config, tab.fields)[0]) + [1]
    assert tab.form_config(tuple(values)).optimizer == "adamw_8bit"


def through_components(tab: DreamBoothTab, values: list) -> list:
    """What the components give back after showing ``values``: postprocess, then preprocess, as gradio does."""
    out = []
    for component, value in zip(tab.components, values):
        shown = component.postprocess(value)
        out.append(component.preprocess(shown))
    return out


@pytest.mark.parametrize("concepts", [0, 1, 2, MAX_CONCEPTS])
def test_a_form_round_trips_to_an_equal_config(tab: DreamBoothTab, concepts: int) -> None:
    config = non_default_config(concepts)
    values, count = config_to_values(config, tab.fields)
    assert count == max(1, concepts)
    again = tab.form_config((*through_components(tab, values), count))
    assert again == config
    assert again.to_dict() == config.to_dict()


def test_slots_past_the_concept_count_and_untouched_slots_are_left_out() -> None:
    fields = form_fields()
    config = non_default_config(3)
    values, _ = config_to_values(config, fields)
    assert values_to_config(fields, values, 2).concepts == config.concepts[:2]
    empty, count = config_to_values(dataclasses.replace(config, concepts=[]), fields)
    assert count == 1 and values_to_config(fields, empty, 1).concepts == []


def test_a_wrong_value_is_refused_with_the_options_name(tab: DreamBoothTab) -> None:
    values, count = config_to_values(non_default_config(1), tab.fields)
    values[tab._index("resolution")] = 70000
    with pytest.raises(ConfigError, match="'resolution' must be between"):
        tab.form_config((*values, count))
    assert "**Error:**" in tab.save(*values, count)


def test_create_open_save_and_reload_restore_the_form_from_config_json(tab: DreamBoothTab, models: Path) -> None:
    assert "base.safetensors" in tab.list_sources()["choices"]
    filled = tab.create_model("zwx", "base.safetensors")
    assert "Created **zwx**" in filled[-1]
    values = filled[1 : 1 + len(tab.fields)]
    assert values[tab._index("model_name")] == "zwx"
    assert values[tab._index("source_checkpoint")] == str(models / "Stable-diffusion" / "base.safetensors")
    values[tab._index("max_steps")] = 7
    values[tab._index("concepts[0].instance_prompt")] = "photo of zwx dog"
    assert "Saved" in tab.save(*values, 1)
    config = tab.supervisor.load_config("zwx")
    assert config.max_steps == 7 and config.concepts[0].instance_prompt == "photo of zwx dog"

    restored = tab.restore()  # what a page reload shows
    assert restored[1 : 1 + len(tab.fields)] == config_to_values(config, tab.fields)[0]
    assert restored[-1] == "idle"
    tab.current_model = None  # after a restart of the web UI: the model saved last
    assert tab.restore()[1 : 1 + len(tab.fields)] == config_to_values(config, tab.fields)[0]
    assert "not allowed" in tab.create_model("../evil", "base.safetensors")[-1]


def test_train_polls_progress_lists_checkpoints_and_refuses_a_second_start(
    tab: DreamBoothTab, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_ENGINE_DELAY", "0.1")  # slow enough that the second start meets the first run
    filled = tab.create_model("zwx", "base.safetensors")
    values = filled[1 : 1 + len(tab.fields)]
    values[tab._index("concepts[0].instance_dir")] = "photos"
    values[tab._index("concepts[0].instance_prompt")] = "photo of zwx dog"
    values[tab._index("concepts[0].class_prompt")] = "photo of a dog"
    values[tab._index("max_steps")] = 4
    values[tab._index("save_every")] = 2
    message, state, _ = tab.train(*values, 1)
    assert state == "running" and "Training **zwx**" in message
    busy = tab.train(*values, 1)[0]
    assert "is training now" in busy
    assert tab.supervisor.wait(30)
    progress, plot, _gallery, checkpoints, state, memo = tab.poll("zwx", {})
    assert state == "idle" and 'data-state="finished"' in progress and 'data-step="4"' in progress
    assert 'data-points="4"' in plot
    assert checkpoints["choices"] == ["zwx_2.safetensors", "zwx_4.safetensors"]
    assert checkpoints["value"] == "zwx_4.safetensors"
    again = tab.poll("zwx", memo)
    assert again[3] == gr.update() and again[2] == gr.update()  # nothing new: nothing re-sent
    assert "now uses" in tab.use_checkpoint("zwx", "zwx_4.safetensors")[0]
    assert tab.supervisor.host.names().count("select_checkpoint") == 1
    lora = tab.supervisor.load_config("zwx")
    lora.method = "lora"  # the same run as a LoRA: its files go to the Lora folder, and txt2img gets its tag
    tab.supervisor.start(lora)
    assert tab.supervisor.wait(30)
    message, tag = tab.use_checkpoint("zwx", "zwx_4.safetensors")
    assert tag == "<lora:zwx_4:1>" and tag in message
    assert tab.supervisor.host.names().count("select_checkpoint") == 1  # a LoRA is no checkpoint to switch to
    assert "Nothing is training" in tab.cancel()


def test_plot_and_progress_show_the_numbers() -> None:
    history = [{"step": s, "loss": 1 / s, "lr": 1e-6 * s} for s in range(1, 6)]
    svg = loss_lr_svg(history)
    assert svg.count("<polyline") == 2 and 'data-points="5"' in svg and "step 5" in svg
    assert "No training steps yet" in loss_lr_svg([])
    status = SimpleNamespace(
        running=True,
        model="zwx",
        step=3,
        total=10,
        loss=0.1234,
        lr=2e-6,
        it_per_s=2.5,
        eta_s=2.8,
        memory_mb=1234.0,
        message="Training",
        last_checkpoint=None,
        error=None,
        cancelled=False,
        finished=False,
        warnings=["<careful>"],
    )
    html = progress_html(status)
    for text in (
        "step 3/10",
        "loss 0.1234",
        "2.50 it/s",
        "ETA 0:02",
        "VRAM 1,234 MB",
        "width:30.0%",
        "&lt;careful&gt;",
    ):
        assert text in html


def test_standalone_host_lists_checkpoints_of_its_models_folder(models: Path) -> None:
    host = StandaloneHost(models)
    assert host.checkpoint_titles() == ["base.safetensors", "sub/other.ckpt"]
    assert host.checkpoint_file("sub/other.ckpt") == models / "Stable-diffusion" / "sub" / "other.ckpt"
    with pytest.raises(KeyError):
        host.checkpoint_file("missing.safetensors")
    (models / "Stable-diffusion" / "new.safetensors").write_bytes(b"new")
    (models / "Stable-diffusion" / "new.safetensors.partial").write_bytes(b"half")
    host.refresh_checkpoints()
    assert host.checkpoint_titles() == ["base.safetensors", "new.safetensors", "sub/other.ckpt"]
    assert host.select_checkpoint(models / "Stable-diffusion" / "new.safetensors") == "new.safetensors"
    assert host.interrupt_requested() is False


def test_the_picked_source_names_its_family_and_hides_options_that_do_not_apply(
    tab: DreamBoothTab, models: Path, tokenizer_dir: Path
) -> None:
    from tiny_families import build_tiny_sdxl, write_tiny_single_file

    write_tiny_single_file(build_tiny_sdxl(tokenizer_dir), "sdxl", models / "Stable-diffusion" / "xl.safetensors")
    from dreambooth.demo.run import DEMO_CHECKPOINT

    (models / "Stable-diffusion" / "demo.safetensors").write_bytes(DEMO_CHECKPOINT.read_bytes())
    tab.host.refresh_checkpoints()
    second = [i for i, f in enumerate(tab.fields) if f.spec.requires == "text_encoder_2"]
    assert {tab.fields[i].spec.name for i in second} == {"train_text_encoder_2", "text_encoder_2_lr"}

    info, *shown = tab.describe_source("xl.safetensors")
    assert "**SDXL**" in info["value"] and "1024 px" in info["value"]
    assert [u["visible"] for u in shown] == [True, True]
    info, *shown = tab.describe_source("demo.safetensors")
    assert "**SD 1.x**" in info["value"] and "64 px" in info["value"]
    assert [u["visible"] for u in shown] == [False, False]
    info, *shown = tab.describe_source("base.safetensors")  # 4 bytes: not a checkpoint
    assert "not a readable checkpoint" in info["value"] and all(u["visible"] for u in shown)
