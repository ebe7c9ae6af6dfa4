"""Diffusers config folders as JSON: read one (filling what it lacks from the family's shipped folder) and write
one."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from ..fileio import write_atomic
from .families.base import COMMON_CONFIG_FILES, ModelFamily


def read_config_folder(folder: Path, family: ModelFamily | None = None) -> dict[str, dict]:
    """The JSON of a diffusers config folder's files: the family's ``config_files``, a file the folder lacks taken
    from the family's stock folder (diffusers folders often have no ``model_index.json``); without a family, the
    files of :data:`COMMON_CONFIG_FILES` and ``text_encoder_2/config.json`` that the folder has."""
    if family is None:
        names = [n for n in (*COMMON_CONFIG_FILES, "text_encoder_2/config.json") if (folder / n).is_file()]
        return {name: json.loads((folder / name).read_text(encoding="utf-8")) for name in names}
    configs = {}
    for name in family.config_files:
        file = folder / name
        if not file.is_file():
            file = family.stock_config_folder() / name
        configs[name] = json.loads(file.read_text(encoding="utf-8"))
    return configs


def write_config_folder(configs: Mapping[str, dict], folder: Path) -> Path:
    """Write ``configs`` (file name → JSON) as a diffusers config folder; ``model_index.json`` last."""
    for name in sorted(configs, key=lambda n: n == "model_index.json"):
        file = folder / name
        file.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(configs[name], indent=2, sort_keys=True)
        write_atomic(file, lambda p, text=text: p.write_text(text, encoding="utf-8"))
    return folder
