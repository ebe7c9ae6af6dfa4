"""A small stand-in for the web UI's ``modules`` package that behaves like it where a1111.py touches it.

It holds every name of ``tests/host_contract.json`` with the pinned signatures (``test_host_contract`` checks
that with the same source checker it runs on a real web UI), so a1111.py can run in CI, where no web UI is
installed. Calls that matter are logged in ``modules.calls``.
"""

from __future__ import annotations

from pathlib import Path

FILES = {
    "__init__.py": "calls = []\n",
    "paths.py": "models_path = None\n",
    "paths_internal.py": "",
    "devices.py": """
from modules import calls


def torch_gc():
    calls.append(("torch_gc",))
""",
    "fifo_lock.py": """
import threading


class FIFOLock(object):
    def __init__(self):
        self._lock = threading.Lock()

    def acquire(self, blocking=True):
        return self._lock.acquire(blocking)

    def release(self):
        self._lock.release()
""",
    "call_queue.py": """
from modules import fifo_lock

queue_lock = fifo_lock.FIFOLock()
""",
    "script_callbacks.py": """
callback_map = {"callbacks_ui_tabs": [], "callbacks_app_started": [], "callbacks_ui_settings": []}


def on_app_started(callback, *, name=None):
    callback_map["callbacks_app_started"].append(callback)


def on_ui_tabs(callback, *, name=None):
    callback_map["callbacks_ui_tabs"].append(callback)


def on_ui_settings(callback, *, name=None):
    callback_map["callbacks_ui_settings"].append(callback)
""",
    "cmd_args.py": """
import argparse

parser = argparse.ArgumentParser()
parser.add_argument("--api-auth", type=str, default=None)
parser.add_argument("--freeze-settings", action='store_true', default=False)
""",
    "shared_options.py": """
from modules.options import OptionInfo

options_templates = {
    "sd_model_checkpoint": OptionInfo(None, "Stable Diffusion checkpoint"),
    "sd_checkpoint_dropdown_use_short": OptionInfo(False, "Checkpoint dropdown: use filenames without paths"),
}
""",
    "options.py": """
from modules import calls


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before='', comment_after='', infotext=None, restrict_api=False,
                 category_id=None):
        self.default = default
        self.label = label
        self.onchange = onchange
        self.section = section


class Options:
    def __init__(self, data_labels, restricted_opts):
        self.data_labels = dict(data_labels)
        self.data = {k: v.default for k, v in data_labels.items()}

    def __getattr__(self, item):
        if item != "data" and item in self.data:
            return self.data[item]
        raise AttributeError(item)

    def set(self, key, value, is_api=False, run_callbacks=True):
        calls.append(("opts.set", key, value))
        if self.data.get(key) == value:
            return False
        self.data[key] = value
        onchange = self.data_labels[key].onchange
        if run_callbacks and onchange is not None:
            onchange()
        return True

    def save(self, filename):
        calls.append(("opts.save", filename))

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)
""",
    "shared_state.py": """
class State:
    interrupted = False
    job = ""
    job_count = 0
    sampling_step = 0
    sampling_steps = 0
    textinfo = None

    def begin(self, job: str = "(unknown)"):
        self.interrupted = False
        self.job = job

    def end(self):
        self.job = ""
        self.job_count = 0

    def interrupt(self):
        self.interrupted = True
""",
    "sd_models_types.py": """
class WebuiSdModel:
    sd_checkpoint_info: 'CheckpointInfo'
""",
    "sd_models.py": """
import hashlib
import os
import re

from modules import calls, shared

model_path = None
checkpoints_list = {}
checkpoint_aliases = {}


class CheckpointInfo:
    # as the web UI 1.10 names a checkpoint: no hash in its title until the file's SHA-256 is known (cached, or
    # computed when the checkpoint is first loaded: calculate_shorthash)
    def __init__(self, filename):
        self.filename = filename
        name = os.path.relpath(filename, model_path).replace(os.sep, "/")
        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_"))[0]
        with open(filename, "rb") as file:
            file.seek(0x100000)
            self.hash = hashlib.sha256(file.read(0x10000)).hexdigest()[0:8]
        self.sha256 = None
        self.shorthash = None
        self.title = name
        self.short_title = self.name_for_extra
        self.ids = [self.hash, self.model_name, self.title, name, self.name_for_extra, f"{name} [{self.hash}]"]

    def register(self):
        checkpoints_list[self.title] = self
        for id in self.ids:
            checkpoint_aliases[id] = self

    def calculate_shorthash(self):
        with open(self.filename, "rb") as file:
            self.sha256 = hashlib.sha256(file.read()).hexdigest()
        self.shorthash = self.sha256[0:10]
        self.ids += [self.shorthash, self.sha256, f"{self.name} [{self.shorthash}]",
                     f"{self.name_for_extra} [{self.shorthash}]"]
        old_title = self.title
        self.title = f"{self.name} [{self.shorthash}]"
        self.short_title = f"{self.name_for_extra} [{self.shorthash}]"
        items = [(self.title if k == old_title else k, v) for k, v in checkpoints_list.items()]
        checkpoints_list.clear()
        checkpoints_list.update(items)
        self.register()
        return self.shorthash


class SdModelData:
    def __init__(self):
        self.sd_model = None
        self.loaded_sd_models = []


model_data = SdModelData()


class FakeModel:
    def __init__(self, info):
        self.sd_checkpoint_info = info


def list_models():
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    for root, _, files in sorted(os.walk(model_path)):
        for name in sorted(files):
            if name.endswith((".safetensors", ".ckpt")):
                CheckpointInfo(os.path.join(root, name)).register()


re_strip_checksum = re.compile(r"\\s*\\[[^]]+]\\s*$")


def get_closet_checkpoint_match(search_string):  # the web UI 1.10's (lines wrapped)
    if not search_string:
        return None

    checkpoint_info = checkpoint_aliases.get(search_string, None)
    if checkpoint_info is not None:
        return checkpoint_info

    found = sorted([info for info in checkpoints_list.values() if search_string in info.title],
                   key=lambda x: len(x.title))
    if found:
        return found[0]

    search_string_without_checksum = re.sub(re_strip_checksum, '', search_string)
    found = sorted([info for info in checkpoints_list.values() if search_string_without_checksum in info.title],
                   key=lambda x: len(x.title))
    if found:
        return found[0]

    return None


def select_checkpoint():
    return checkpoint_aliases.get(shared.opts.sd_model_checkpoint) or next(iter(checkpoints_list.values()))


def send_model_to_cpu(m):
    calls.append(("send_model_to_cpu", m.sd_checkpoint_info.title))


def send_model_to_device(m):
    calls.append(("send_model_to_device", m.sd_checkpoint_info.title))


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    calls.append(("reload_model_weights", info.title))
    model_data.sd_model = FakeModel(info)
""",
    "shared_items.py": """
def list_checkpoint_tiles(use_short=False):
    from modules import sd_models
    return [x.short_title if use_short else x.title for x in sd_models.checkpoints_list.values()]


def refresh_checkpoints():
    from modules import calls, sd_models
    calls.append(("refresh_checkpoints",))
    return sd_models.list_models()
""",
    "shared.py": """
import argparse

from modules import options, shared_items, shared_options

cmd_opts = argparse.Namespace(api_auth=None, freeze_settings=False)
config_filename = "config.json"
settings_components = {}
state = None
opts = options.Options(shared_options.options_templates, set())
OptionInfo = options.OptionInfo
list_checkpoint_tiles = shared_items.list_checkpoint_tiles
refresh_checkpoints = shared_items.refresh_checkpoints
""",
}


def write_fake_webui(root: Path) -> Path:
    """Write the stand-in ``modules`` package under ``root`` (put ``root`` on sys.path to import it)."""
    package = root / "modules"
    package.mkdir(parents=True)
    for name, text in FILES.items():
        (package / name).write_text(text.lstrip("\n"), encoding="utf-8")
    return root
