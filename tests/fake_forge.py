"""A small stand-in for Forge where ``host/forge.py`` touches it: the web UI's ``modules`` (tests/fake_webui.py,
with Forge's dropdown titles), plus ``modules_forge.main_entry`` and ``backend.memory_management``.

It holds every name of ``tests/forge_contract.json`` with the pinned signatures (``test_forge_host`` checks that
with the source checker it runs on a real Forge). Calls that matter are logged in ``modules.calls``.
"""

from __future__ import annotations

from pathlib import Path

from fake_webui import write_fake_webui

FORGE_FILES = {
    "modules_forge/__init__.py": "",
    "modules_forge/main_entry.py": """
from modules import calls, sd_models, shared


def refresh_model_loading_parameters():
    calls.append(("refresh_model_loading_parameters", shared.opts.sd_model_checkpoint))


def checkpoint_change(ckpt_name: str, save=True, refresh=True):
    new = sd_models.get_closet_checkpoint_match(ckpt_name)
    if new == sd_models.get_closet_checkpoint_match(shared.opts.data.get("sd_model_checkpoint") or ""):
        return False
    shared.opts.set("sd_model_checkpoint", ckpt_name)
    calls.append(("checkpoint_change", ckpt_name))
    if refresh:
        refresh_model_loading_parameters()
    return True
""",
    "backend/__init__.py": "",
    "backend/memory_management.py": """
from modules import calls

current_loaded_models = []


class LoadedModel:
    def __init__(self, model):
        self.model = model


def unload_all_models():
    calls.append(("unload_all_models", [m.model for m in current_loaded_models]))
    current_loaded_models.clear()


def soft_empty_cache(force=False):
    calls.append(("soft_empty_cache",))


def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):
    calls.append(("load_models_gpu", list(models)))
    current_loaded_models.extend(LoadedModel(m) for m in models)
""",
}

FORGE_SHARED_ITEMS = """
def list_checkpoint_tiles(use_short=False):
    from modules import sd_models
    return [x.short_title if use_short else x.name for x in sd_models.checkpoints_list.values()]


def refresh_checkpoints():
    from modules import calls, sd_models
    calls.append(("refresh_checkpoints",))
    return sd_models.list_models()
"""


def write_fake_forge(root: Path) -> Path:
    """Write the stand-in Forge under ``root`` (put ``root`` on sys.path to import it)."""
    write_fake_webui(root)
    (root / "modules" / "shared_items.py").write_text(FORGE_SHARED_ITEMS.lstrip("\n"), encoding="utf-8")
    for name, text in FORGE_FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.lstrip("\n"), encoding="utf-8")
    return root
