"""The web UI's ``.yaml`` beside a checkpoint of unusual shape (``models/host_yaml.py``) keeps working when the
models folder is moved: it names its text encoder by a model name found in the Hugging Face cache, never a path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from dreambooth.demo.run import DEMO_CONFIG_DIR
from dreambooth.models.host_yaml import _transformers_major, hub_cache, write_host_yaml

# What the web UI does with the yaml (modules/sd_models.py load_model → instantiate_from_config →
# ldm FrozenCLIPEmbedder(version)), with its sd_disable_initialization lookups: the cache first, with
# local_files_only=True; a file not found there would be fetched from the network, so the script records it.
AS_THE_WEB_UI = r"""
import json, sys
import yaml
import transformers.configuration_utils as configuration_utils
import transformers.tokenization_utils_base as tokenization_utils_base
from transformers import CLIPTextConfig, CLIPTokenizer

network = []

def cache_first(original):
    def lookup(path_or_repo_id, filename, *args, local_files_only=False, **kwargs):
        found = original(path_or_repo_id, filename, *args, local_files_only=True, **kwargs)
        if found is None:
            network.append(filename)
        return found
    return lookup

configuration_utils.cached_file = cache_first(configuration_utils.cached_file)
tokenization_utils_base.cached_file = cache_first(tokenization_utils_base.cached_file)
with open(sys.argv[1], encoding="utf-8") as f:
    version = yaml.safe_load(f)["model"]["params"]["cond_stage_config"]["params"]["version"]
tokenizer = CLIPTokenizer.from_pretrained(version)
config = CLIPTextConfig.from_pretrained(version)  # the web UI's CLIPTextModel.from_pretrained(None, config=version)
print(json.dumps({"network": network, "hidden_size": config.hidden_size, "layers": config.num_hidden_layers,
                  "ids": tokenizer("a zwx shape").input_ids}))
"""


def _load_like_the_web_ui(yaml_path: Path, cache: Path, cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(TRANSFORMERS_CACHE=str(cache), HF_HUB_CACHE=str(cache), HF_ENDPOINT="http://127.0.0.1:9",
               HF_HUB_DISABLE_TELEMETRY="1")
    done = subprocess.run([sys.executable, "-c", AS_THE_WEB_UI, str(yaml_path)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_yaml_still_loads_after_the_models_folder_moves(tmp_path, tokenizer_dir, monkeypatch):
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("TRANSFORMERS_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    output = tmp_path / "webui" / "models" / "Stable-diffusion" / "zwx"
    output.mkdir(parents=True)
    checkpoint = output / "zwx_400.safetensors"
    checkpoint.write_bytes(b"")
    write_host_yaml(checkpoint, DEMO_CONFIG_DIR, tokenizer_dir=str(tokenizer_dir))
    assert sorted(p.name for p in output.iterdir()) == ["zwx_400.safetensors", "zwx_400.yaml"]  # nothing external

    moved = tmp_path / "mounted-elsewhere"
    shutil.move(str(tmp_path / "webui" / "models"), str(moved))
    elsewhere = tmp_path / "another-working-folder"
    elsewhere.mkdir()
    loaded = _load_like_the_web_ui(moved / "Stable-diffusion" / "zwx" / "zwx_400.yaml", cache, elsewhere)
    if _transformers_major() < 5:  # the web UI's transformers (4.30): every file it asks for is in the cache
        assert loaded["network"] == []
    else:  # transformers 5 also asks for optional files the web UI's version never reads (tokenizer.json ...)
        assert set(loaded["network"]) <= {"tokenizer.json", "chat_template.jinja", "chat_template.json"}
    assert (loaded["hidden_size"], loaded["layers"]) == (64, 4)  # the demo's text encoder, not the stock one
    from transformers import CLIPTokenizer

    assert loaded["ids"] == CLIPTokenizer.from_pretrained(str(tokenizer_dir))("a zwx shape").input_ids


def test_one_cache_entry_serves_every_checkpoint_of_the_same_text_encoder(tmp_path, tokenizer_dir):
    cache = tmp_path / "hf-cache"
    names = set()
    for folder in ("a", "b"):
        checkpoint = tmp_path / folder / "m.safetensors"
        checkpoint.parent.mkdir()
        checkpoint.write_bytes(b"")
        text = write_host_yaml(checkpoint, DEMO_CONFIG_DIR, cache, str(tokenizer_dir)).read_text(encoding="utf-8")
        names.add(yaml.safe_load(text)["model"]["params"]["cond_stage_config"]["params"]["version"])
    assert len(names) == 1 and len(list(cache.iterdir())) == 1
    (name,) = names
    assert name.startswith("dreambooth-local/text-encoder-") and not Path(name).is_absolute()


def test_the_cache_is_where_the_installed_transformers_looks(monkeypatch, tmp_path):
    from transformers.utils import hub

    for variable in ("TRANSFORMERS_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_CACHE", "PYTORCH_TRANSFORMERS_CACHE",
                     "PYTORCH_PRETRAINED_BERT_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TRANSFORMERS_CACHE", str(tmp_path / "transformers"))
    if hasattr(hub, "TRANSFORMERS_CACHE"):  # transformers 4.x, the web UI's 4.30: its own variable first
        assert hub_cache() == tmp_path / "transformers"
    else:  # transformers 5 reads huggingface-hub's
        assert hub_cache() == tmp_path / "hub"
