"""models/tokenizer.py: the CLIP tokenizer rebuilt offline gives the ids OpenAI's tokenizer gives."""

from __future__ import annotations

import importlib.util
import json

import pytest

from dreambooth.errors import ModelFormatError
from dreambooth.models.tokenizer import find_tokenizer_dir, load_clip_tokenizer, open_clip_vocabulary

PROMPTS = ["photo of zwx person", "A PHOTO of a Dog, on the beach!!", "naïve café — 東京 🙂", "", "x" * 300]


def _open_clip_tokenizer():
    """open_clip's own SimpleTokenizer (OpenAI's reference code), loaded without importing open_clip's package."""
    path = open_clip_vocabulary().parent / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("open_clip_reference_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def test_rebuilt_tokenizer_matches_openai_ids(tokenizer_dir):
    ours = load_clip_tokenizer(tokenizer_dir)
    reference = _open_clip_tokenizer()
    for prompt in PROMPTS:
        expected = [reference.sot_token_id] + reference.encode(prompt)[:75] + [reference.eot_token_id]
        assert ours(prompt, truncation=True, max_length=77).input_ids == expected, prompt
    assert len(json.loads((tokenizer_dir / "vocab.json").read_text())) == 49408


def test_a_named_folder_wins_and_a_wrong_one_is_refused(tmp_path, tokenizer_dir):
    assert find_tokenizer_dir(str(tokenizer_dir), tmp_path / "unused") == tokenizer_dir
    with pytest.raises(ModelFormatError, match="vocab.json"):
        find_tokenizer_dir(str(tmp_path), tmp_path / "unused")


def test_the_hugging_face_cache_is_used_before_rebuilding(tmp_path, tokenizer_dir, monkeypatch):
    snapshot = tmp_path / "hub" / "models--openai--clip-vit-large-patch14" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        (snapshot / name).write_bytes((tokenizer_dir / name).read_bytes())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert find_tokenizer_dir(None, tmp_path / "rebuilt") == snapshot
    assert not (tmp_path / "rebuilt").exists()
