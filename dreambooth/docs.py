"""The README's config reference, generated from ``config.py`` so it cannot drift."""

from __future__ import annotations

from .config import Concept, OptionSpec, TrainConfig, option_specs


def options_reference() -> str:
    """Markdown tables of every option of ``TrainConfig`` and ``Concept``, grouped as in the tab."""
    lines = []
    for title, cls in (("Training options (`config.json`)", TrainConfig), ("Concept options (`concepts[i]`)", Concept)):
        lines += [f"#### {title}", "", "| option | type | default | allowed | what it does |", "|---|---|---|---|---|"]
        lines += [_row(spec) for spec in option_specs(cls) if spec.name not in ("version", "concepts")]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _row(spec: OptionSpec) -> str:
    if spec.choices:
        allowed = ", ".join(f"`{c}`" for c in spec.choices)
    elif spec.minimum is not None:
        allowed = f"{spec.minimum:g} – {spec.maximum:g}"
    else:
        allowed = ""
    default = f"`{spec.default!r}`" if not isinstance(spec.default, str) else f'`"{spec.default}"`'
    return f"| `{spec.name}` | {spec.type} | {default} | {allowed} | {spec.label}: {spec.help.replace('|', '/')} |"
