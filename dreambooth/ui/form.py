"""The tab's form as data: which field shows which option, and the way between a form and a ``TrainConfig``.

No gradio here: the tab builds one component per :class:`Field`, in :func:`form_fields` order, and these
functions convert the components' values to a config and back, so the mapping is tested on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..config import Concept, OptionSpec, TrainConfig, option_specs
from ..errors import ConfigError

MAX_CONCEPTS = 4
"""Concept panels in the tab (gradio 3.41 cannot add components after the page is built)."""


@dataclass(frozen=True)
class Field:
    """One input of the form: a ``TrainConfig`` option, or an option of the concept in slot ``concept``."""

    spec: OptionSpec
    concept: int | None = None

    @property
    def key(self) -> str:
        """The option's path in the config's JSON, e.g. ``resolution`` or ``concepts[1].instance_prompt``."""
        return self.spec.name if self.concept is None else f"concepts[{self.concept}].{self.spec.name}"


def form_fields(max_concepts: int = MAX_CONCEPTS) -> list[Field]:
    """Every option of ``TrainConfig`` (but ``concepts``) in declaration order, then each concept slot's options."""
    fields = [Field(spec) for spec in option_specs(TrainConfig) if spec.name != "concepts"]
    for slot in range(max_concepts):
        fields.extend(Field(spec, slot) for spec in option_specs(Concept))
    return fields


def to_widget(spec: OptionSpec, value: Any) -> Any:
    """A config value as its component shows it (a list of prompts becomes one prompt a line)."""
    if spec.type.startswith("list["):
        return "\n".join(str(item) for item in value)
    return value


def from_widget(spec: OptionSpec, value: Any) -> Any:
    """A component's value as the config stores it; ``TrainConfig.from_dict`` checks it afterwards."""
    if spec.type.startswith("list["):
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]
    if spec.type == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if spec.type == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def config_to_values(config: TrainConfig, fields: Sequence[Field]) -> tuple[list[Any], int]:
    """The components' values for ``config`` (empty slots get defaults) and how many concept slots it uses."""
    if len(config.concepts) > MAX_CONCEPTS:
        raise ConfigError(
            f"Model {config.model_name!r} has {len(config.concepts)} concepts; the tab shows up to {MAX_CONCEPTS}.",
            "Edit its config.json directly, or train it from the command line.",
        )
    data = config.to_dict()
    values = []
    for f in fields:
        if f.concept is None:
            value = data[f.spec.name]
        elif f.concept < len(config.concepts):
            value = data["concepts"][f.concept][f.spec.name]
        else:
            value = f.spec.default
        values.append(to_widget(f.spec, value))
    return values, max(1, len(config.concepts))


def values_to_config(fields: Sequence[Field], values: Sequence[Any], concept_count: int) -> TrainConfig:
    """Build and check the config that the form shows; slots past ``concept_count`` and untouched slots are left out."""
    if len(values) != len(fields):
        raise ValueError(f"{len(values)} values for {len(fields)} fields")
    data: dict[str, Any] = {}
    slots: dict[int, dict[str, Any]] = {}
    for f, value in zip(fields, values):
        if f.concept is None:
            data[f.spec.name] = from_widget(f.spec, value)
        elif f.concept < concept_count:
            slots.setdefault(f.concept, {})[f.spec.name] = from_widget(f.spec, value)
    defaults = Concept().__dict__
    data["concepts"] = [slot for _, slot in sorted(slots.items()) if slot != defaults]
    return TrainConfig.from_dict(data)
