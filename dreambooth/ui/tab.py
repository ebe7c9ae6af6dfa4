"""The DreamBooth tab: a gradio form generated from ``dreambooth.config``, wired to a :class:`Supervisor`.

Runs on gradio 3.41 (the AUTOMATIC1111 web UI) and 4.x (Forge, and the standalone app's modern profile): only
components, arguments and ``gr.update`` that both versions share are used. Every option of ``TrainConfig`` and
``Concept`` gets one component with the declaration's label, help, choices, range and default; choices whose
optional package is missing are left out of their dropdown and the reason is shown under it.

While a run is active, ``javascript/dreambooth.js`` clicks the hidden *poll* button once a second; each click
returns the progress, the loss/LR plot, new preview images and the saved checkpoints. Nothing polls when no
run is active or the tab is not shown.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import gradio as gr

from ..config import OptionSpec, TrainConfig, option_specs
from ..errors import ConfigError, DreamBoothError
from ..host.base import Host
from ..supervisor import Supervisor
from .features import choice_problems, unavailable_choices
from .form import MAX_CONCEPTS, Field, config_to_values, form_fields, values_to_config
from .plot import loss_lr_svg
from .progress import progress_html

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT_FILE = REPO_ROOT / "javascript" / "dreambooth.js"
STYLE_FILE = REPO_ROOT / "style.css"
OPEN_GROUPS = {"Schedule"}
"""Option groups whose panel starts open; the others start folded."""
RUNNING, IDLE = "running", "idle"


def element_id(key: str) -> str:
    """A field's HTML id: ``concepts[1].instance_prompt`` → ``dreambooth_concepts_1_instance_prompt``."""
    return "dreambooth_" + re.sub(r"[^A-Za-z0-9]+", "_", key).strip("_")


def build_component(spec: OptionSpec, elem_id: str, unavailable: dict[str, str] | None = None) -> Any:
    """The gradio component for one option, showing its label, help, choices, range and default."""
    common: dict[str, Any] = {"label": spec.label, "info": spec.help, "elem_id": elem_id}
    if spec.name in ("version", "model_name"):
        common["interactive"] = False
    if spec.type == "bool":
        return gr.Checkbox(value=spec.default, **common)
    if spec.choices:
        unavailable = unavailable or {}
        choices = [c for c in spec.choices if c not in unavailable]
        if unavailable:
            common["info"] = (
                spec.help
                + " Unavailable here: "
                + "; ".join(f"{choice} ({reason})" for choice, reason in unavailable.items())
                + "."
            )
        return gr.Dropdown(choices=choices, value=spec.default, **common)
    if spec.type in ("int", "float"):
        step = 1 if spec.type == "int" else _step(spec.default)
        return gr.Number(
            value=spec.default,
            precision=0 if spec.type == "int" else None,
            minimum=spec.minimum,
            maximum=spec.maximum,
            step=step,
            **common,
        )
    if spec.type.startswith("list["):
        common["info"] = spec.help + " One a line."
        return gr.Textbox(value="\n".join(spec.default), lines=3, **common)
    return gr.Textbox(value=spec.default, lines=1, **common)


def _step(default: float) -> float:
    """A spinner step of the default's order of magnitude (0.01 for a default of 0)."""
    if not default:
        return 0.01
    return float(f"1e{int(f'{abs(default):e}'.split('e')[1])}")


def _event_kwargs(name: str, code: str) -> dict[str, Any]:
    """``js=`` on gradio 4, ``_js=`` on gradio 3, for an event that runs browser code."""
    parameters = inspect.signature(gr.Blocks.load).parameters
    return {name if name in parameters else "_js": code}


ADD_TO_TXT2IMG_PROMPT = """(tag) => {
    if (!tag) return [];
    const root = typeof gradioApp === "function" ? gradioApp() : document;
    const box = root.querySelector("#txt2img_prompt textarea");
    if (box && !box.value.includes(tag)) {
        box.value = box.value.trim() ? box.value.trim() + " " + tag : tag;
        box.dispatchEvent(new Event("input", {bubbles: true}));
    }
    return [];
}"""
"""Browser code run after "Use in txt2img" on a LoRA: its tag goes at the end of the txt2img prompt, once."""


class DreamBoothTab:
    """The tab's components and the handlers behind them."""

    def __init__(self, supervisor: Supervisor, host: Host, default_source: str | None = None) -> None:
        self.supervisor = supervisor
        self.host = host
        self.default_source = default_source
        """The source checkpoint the "new model" form starts with, while the host lists it."""
        self.fields: list[Field] = form_fields()
        self.unavailable = unavailable_choices()
        self.current_model: str | None = None
        """The model last opened, created or started: a reloaded page shows it again."""

    # ---- building ------------------------------------------------------------------------------------------

    def build(self, standalone: bool = False) -> gr.Blocks:
        """Lay the tab out and wire its events; ``standalone`` adds the page's own CSS and script."""
        css = STYLE_FILE.read_text(encoding="utf-8") if standalone and STYLE_FILE.is_file() else None
        with gr.Blocks(analytics_enabled=False, css=css, title="DreamBooth") as blocks:
            self.blocks = blocks
            self._build_model_row()
            self.message = gr.Markdown("", elem_id="dreambooth_message")
            with gr.Row():
                with gr.Column(scale=3):
                    self._build_form()
                with gr.Column(scale=2):
                    self._build_run_panel()
            self._wire()
            if standalone and SCRIPT_FILE.is_file():
                script = SCRIPT_FILE.read_text(encoding="utf-8")
                blocks.load(None, None, None, **_event_kwargs("js", f"() => {{\n{script}\n}}"))
        return blocks

    def _build_model_row(self) -> None:
        with gr.Row():
            self.model_choice = gr.Dropdown(
                choices=self.supervisor.list_models(),
                label="Model",
                info="A model folder with its config.json.",
                elem_id="dreambooth_model",
            )
            self.refresh_models = gr.Button("🔄", elem_id="dreambooth_refresh_models", scale=0, min_width=40)
            self.open_button = gr.Button("Open", elem_id="dreambooth_open", scale=0, min_width=80)
            self.new_name = gr.Textbox(
                label="New model name", elem_id="dreambooth_new_name", info="Letters, digits, '.', '_' and '-'."
            )
            titles = self._titles()
            self.source = gr.Dropdown(
                choices=titles,
                value=self._preselected_source(titles),
                label="Source checkpoint",
                info="One of the checkpoints the web UI lists.",
                elem_id="dreambooth_source",
            )
            self.refresh_sources = gr.Button("🔄", elem_id="dreambooth_refresh_sources", scale=0, min_width=40)
            self.create_button = gr.Button("Create", elem_id="dreambooth_create", scale=0, min_width=80)
        self.source_info = gr.Markdown("", elem_id="dreambooth_source_family")

    def _build_form(self) -> None:
        self.components: list[Any] = []
        by_key = {}
        specs = option_specs(TrainConfig)
        self.concept_count = gr.Slider(
            1,
            MAX_CONCEPTS,
            value=1,
            step=1,
            label="Concepts",
            info="How many subjects this model learns.",
            elem_id="dreambooth_concept_count",
        )
        self.concept_panels = []
        for slot in range(MAX_CONCEPTS):
            with (
                gr.Column(visible=slot == 0, elem_id=f"dreambooth_concept_{slot}") as panel,
                gr.Accordion(f"Concept {slot + 1}", open=slot == 0),
            ):
                for field in self.fields:
                    if field.concept == slot:
                        by_key[field.key] = self._component(field)
            self.concept_panels.append(panel)
        groups: dict[str, list[Field]] = {}
        for field in self.fields:
            if field.concept is None:
                groups.setdefault(field.spec.group, []).append(field)
        for group in dict.fromkeys(s.group for s in specs):
            if group not in groups:
                continue
            with gr.Accordion(group, open=group in OPEN_GROUPS, elem_id=element_id("group " + group)):
                for field in groups[group]:
                    by_key[field.key] = self._component(field)
        self.components = [by_key[f.key] for f in self.fields]

    def _component(self, field: Field) -> Any:
        return build_component(field.spec, element_id(field.key), self.unavailable.get(field.spec.name))

    def _build_run_panel(self) -> None:
        with gr.Row():
            self.save_button = gr.Button("Save settings", elem_id="dreambooth_save")
            self.train_button = gr.Button("Train", variant="primary", elem_id="dreambooth_train")
            self.cancel_button = gr.Button("Cancel", variant="stop", elem_id="dreambooth_cancel")
        self.progress = gr.HTML(progress_html(self.supervisor.status()), elem_id="dreambooth_progress")
        self.plot = gr.HTML(loss_lr_svg([]), elem_id="dreambooth_plot")
        self.gallery = gr.Gallery(label="Newest previews", columns=4, elem_id="dreambooth_samples")
        self.checkpoints = gr.Radio(choices=[], label="Saved checkpoints", elem_id="dreambooth_checkpoints")
        self.use_button = gr.Button("Use in txt2img", elem_id="dreambooth_use")
        self.lora_tag = gr.Textbox("", show_label=False, elem_id="dreambooth_lora_tag",
                                   elem_classes=["dreambooth-hidden"])
        self.run_state = gr.Textbox(
            IDLE, show_label=False, elem_id="dreambooth_run_state", elem_classes=["dreambooth-hidden"]
        )
        self.poll_button = gr.Button("poll", elem_id="dreambooth_poll", elem_classes=["dreambooth-hidden"])
        self.memo = gr.State({})

    def _wire(self) -> None:
        form = [*self.components, self.concept_count]
        filled = [self.model_choice, *form, *self.concept_panels, self.checkpoints, self.message]
        self.refresh_models.click(self.list_models, None, self.model_choice)
        self.refresh_sources.click(self.list_sources, None, self.source)
        self.open_button.click(self.open_model, self.model_choice, filled)
        self.create_button.click(self.create_model, [self.new_name, self.source], filled)
        self.concept_count.change(self.show_concepts, self.concept_count, self.concept_panels)
        self.save_button.click(self.save, form, self.message)
        self.train_button.click(self.train, form, [self.message, self.run_state, self.progress])
        self.cancel_button.click(self.cancel, None, self.message)
        self.use_button.click(
            self.use_checkpoint, [self.components[self._index("model_name")], self.checkpoints],
            [self.message, self.lora_tag],
        ).then(None, self.lora_tag, None, **_event_kwargs("js", ADD_TO_TXT2IMG_PROMPT))
        self.poll_button.click(
            self.poll,
            [self.components[self._index("model_name")], self.memo],
            [self.progress, self.plot, self.gallery, self.checkpoints, self.run_state, self.memo],
            show_progress="hidden",
        )
        self.blocks.load(self.restore, None, [*filled, self.source, self.run_state])
        self.part_dependent = [i for i, f in enumerate(self.fields) if f.spec.requires]
        described = [self.source_info, *(self.components[i] for i in self.part_dependent)]
        self.source.change(self.describe_source, self.source, described)
        self.components[self._index("source_checkpoint")].change(
            self.describe_source, self.components[self._index("source_checkpoint")], described
        )

    def _index(self, key: str) -> int:
        return next(i for i, f in enumerate(self.fields) if f.key == key)

    # ---- handlers ------------------------------------------------------------------------------------------

    def _titles(self) -> list[str]:
        try:
            return self.host.checkpoint_titles()
        except Exception as exc:  # noqa: BLE001 (the host's listing failing must not take the tab down)
            return [f"(cannot list checkpoints: {exc})"]

    def list_models(self) -> Any:
        """Re-read the model folders."""
        return gr.update(choices=self.supervisor.list_models())

    def list_sources(self) -> Any:
        """Ask the host to re-list its checkpoints and show them."""
        self.host.refresh_checkpoints()
        return gr.update(choices=self._titles())

    def open_model(self, name: str | None) -> list[Any]:
        """Fill the form from ``<name>/config.json``."""
        if not name:
            return self._unchanged_fill("Pick a model to open, or create one.")
        try:
            config = self.supervisor.load_config(name)
        except DreamBoothError as exc:
            return self._unchanged_fill(_error_text(exc))
        return self._fill(config, f"Opened **{name}**.")

    def create_model(self, name: str, source: str | None) -> list[Any]:
        """Make a new model folder from a host checkpoint and show its default settings."""
        try:
            config = self.supervisor.create_model((name or "").strip(), source or "")
        except DreamBoothError as exc:
            return self._unchanged_fill(_error_text(exc))
        return self._fill(config, f"Created **{config.model_name}** from `{Path(config.source_checkpoint).name}`.")

    def describe_source(self, source: str | None) -> list[Any]:
        """Name the picked source's family (read from its header) and show only the options that apply to it."""
        if not source:
            return [gr.update(value=""), *(gr.update(visible=True) for _ in self.part_dependent)]
        from ..models.load import describe_source

        try:
            path = self.host.checkpoint_file(source)
        except KeyError:
            path = Path(source)
        try:
            summary = describe_source(path)
        except DreamBoothError as exc:
            return [gr.update(value=_error_text(exc)), *(gr.update(visible=True) for _ in self.part_dependent)]
        text = (f"**{summary.family}** model · trained at {summary.native_resolution} px · predicts "
                f"{summary.prediction_type.replace('_', '-')}")
        return [
            gr.update(value=text),
            *(gr.update(visible=self.fields[i].spec.requires in summary.parts) for i in self.part_dependent),
        ]

    def show_concepts(self, count: float) -> list[Any]:
        """Show the first ``count`` concept panels."""
        count = int(count or 1)
        return [gr.update(visible=slot < count) for slot in range(MAX_CONCEPTS)]

    def form_config(self, values: tuple[Any, ...]) -> TrainConfig:
        """The config the form shows (``values``: the field components then the concept count)."""
        *field_values, count = values
        config = values_to_config(self.fields, field_values, int(count or 1))
        if not config.model_name:
            raise ConfigError("No model is open.", "Create a model or open one first.")
        for name, missing in self.unavailable.items():
            value = getattr(config, name)
            if value in missing:
                raise ConfigError(f"'{name}' is {value!r}, which is unavailable here: {missing[value]}.")
        problems = choice_problems(config)
        if problems:
            raise ConfigError(" ".join(problems))
        return config

    def save(self, *values: Any) -> str:
        """Write the form to the model's config.json."""
        try:
            config = self.form_config(values)
            self.supervisor.save_config(config)
        except DreamBoothError as exc:
            return _error_text(exc)
        self.current_model = config.model_name
        return f"Saved the settings of **{config.model_name}**."

    def train(self, *values: Any) -> list[Any]:
        """Save the form and start training it."""
        try:
            config = self.form_config(values)
            self.current_model = config.model_name
            self.supervisor.start(config)
        except DreamBoothError as exc:
            return [_error_text(exc), gr.update(), gr.update()]
        status = self.supervisor.status()
        warnings = "".join(f"\n\n⚠ {w}" for w in status.warnings)
        return [f"Training **{config.model_name}**.{warnings}", RUNNING, progress_html(status)]

    def cancel(self) -> str:
        """Ask the running training to stop after its current step."""
        running = self.supervisor.status()
        if not running.running:
            return "Nothing is training."
        self.supervisor.cancel()
        return f"Stopping **{running.model}** after the current step; everything saved so far is kept."

    def use_checkpoint(self, model_name: str, checkpoint: str | None) -> tuple[str, str]:
        """Make the picked checkpoint the web UI's active one, or for a LoRA hand the page its ``<lora:name:1>``
        for the txt2img prompt; returns the message and that tag (empty for a checkpoint)."""
        if not model_name or not checkpoint:
            return "Pick a saved checkpoint first.", ""
        try:
            files = {p.name: p for p in self.supervisor.list_checkpoints(model_name)}
            if checkpoint not in files:
                return f"**Error:** {checkpoint} is no longer there.", ""
            if self.supervisor.load_config(model_name).method == "lora":
                tag = f"<lora:{files[checkpoint].stem}:1>"
                return (f"`{tag}` is added to the txt2img prompt: it applies the LoRA at the strength it was "
                        "trained at, on top of the checkpoint txt2img uses.", tag)
            title = self.host.select_checkpoint(files[checkpoint])
        except DreamBoothError as exc:
            return _error_text(exc), ""
        return f"txt2img now uses **{title}**.", ""

    def poll(self, model_name: str, memo: dict[str, Any] | None) -> list[Any]:
        """Progress, plot, new previews and the saved checkpoints (only what changed) for one poll."""
        memo = dict(memo or {})
        status = self.supervisor.status()
        samples = [p for p in status.samples if Path(p).is_file()][-8:]
        gallery = gr.update()
        if samples != memo.get("samples"):
            memo["samples"] = samples
            gallery = gr.update(value=list(reversed(samples)))
        names = self._checkpoint_names(model_name)
        checkpoints = gr.update()
        if names != memo.get("checkpoints"):
            memo["checkpoints"] = names
            checkpoints = gr.update(choices=names, value=names[-1] if names else None)
        state = RUNNING if status.running else IDLE
        return [progress_html(status), loss_lr_svg(status.history), gallery, checkpoints, state, memo]

    def restore(self) -> list[Any]:
        """On page load: the form of the training, last-opened or last-saved model, the host's checkpoints and
        the run state."""
        running = self.supervisor.running_model()
        name = running or self.current_model or self._last_saved_model()
        fill = self._unchanged_fill("")
        if name:
            try:
                fill = self._fill(self.supervisor.load_config(name), f"Showing **{name}**.")
            except DreamBoothError as exc:
                fill = self._unchanged_fill(_error_text(exc))
        titles = self._titles()
        source = gr.update(choices=titles)
        if self._preselected_source(titles):
            source = gr.update(choices=titles, value=self._preselected_source(titles))
        return [*fill, source, RUNNING if running else IDLE]

    # ---- helpers ------------------------------------------------------------------------------------------

    def _preselected_source(self, titles: list[str]) -> str | None:
        """The default source checkpoint when the host lists it, else None (nothing preselected)."""
        return self.default_source if self.default_source in titles else None

    def _last_saved_model(self) -> str | None:
        """The model whose config.json changed last (what a page shows after the web UI restarted)."""
        folder = self.supervisor.dreambooth_dir
        times = {}
        for name in self.supervisor.list_models():
            try:
                times[name] = (folder / name / "config.json").stat().st_mtime
            except OSError:
                continue
        return max(times, key=times.__getitem__) if times else None

    def _checkpoint_names(self, model_name: str | None) -> list[str]:
        if not model_name:
            return []
        try:
            return [p.name for p in self.supervisor.list_checkpoints(model_name)]
        except DreamBoothError:
            return []

    def _fill(self, config: TrainConfig, message: str) -> list[Any]:
        notes = []
        for name, missing in self.unavailable.items():
            value = getattr(config, name)
            if value in missing:
                default = TrainConfig.__dataclass_fields__[name].default
                notes.append(
                    f"\n\n⚠ '{name}' was {value!r}, unavailable here ({missing[value]}); the form shows {default!r}."
                )
                setattr(config, name, default)
        try:
            values, count = config_to_values(config, self.fields)
        except DreamBoothError as exc:
            return self._unchanged_fill(_error_text(exc))
        self.current_model = config.model_name
        names = self._checkpoint_names(config.model_name)
        return [
            gr.update(choices=self.supervisor.list_models(), value=config.model_name),
            *values,
            count,
            *self.show_concepts(count),
            gr.update(choices=names, value=names[-1] if names else None),
            message + "".join(notes),
        ]

    def _unchanged_fill(self, message: str) -> list[Any]:
        return [
            gr.update(choices=self.supervisor.list_models()),
            *([gr.update()] * (len(self.fields) + 1)),
            *([gr.update()] * MAX_CONCEPTS),
            gr.update(),
            message,
        ]


def _error_text(exc: DreamBoothError) -> str:
    advice = f"\n\n{exc.advice}" if exc.advice else ""
    return f"**Error:** {exc.message}{advice}"


def build_tab(
    supervisor: Supervisor, host: Host, *, standalone: bool = False, default_source: str | None = None
) -> gr.Blocks:
    """The DreamBooth tab as a ``gr.Blocks`` (the web UI's ``on_ui_tabs`` and the standalone app both call this);
    ``default_source`` is the host title preselected as the new model's source checkpoint, when listed."""
    tab = DreamBoothTab(supervisor, host, default_source)
    blocks = tab.build(standalone=standalone)
    blocks.dreambooth_tab = tab  # type: ignore[attr-defined]  # for tests and the standalone app
    return blocks
