"""Find the CLIP tokenizer of SD 1.x without a network.

In order: a folder the user names, the Hugging Face cache that the web UI fills on its first start, or a
tokenizer rebuilt from the byte-pair vocabulary that ``open_clip_torch`` ships (the web UI has it installed).
The rebuilt files are byte-for-byte what OpenAI's CLIP tokenizer uses: the same merges, the same ids.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path

from ..errors import ModelFormatError
from ..fileio import write_atomic

CLIP_REPO_FOLDER = "models--openai--clip-vit-large-patch14"
TOKENIZER_FILES = ("vocab.json", "merges.txt")
_MERGE_COUNT = 49152 - 256 - 2


def find_tokenizer_dir(user_dir: str | os.PathLike[str] | None, cache_dir: Path) -> Path:
    """A folder holding ``vocab.json`` and ``merges.txt`` for SD 1.x's CLIP tokenizer."""
    if user_dir:
        folder = Path(user_dir)
        if not _has_tokenizer(folder):
            raise ModelFormatError(
                f"Tokenizer folder {folder} has no vocab.json and merges.txt.",
                "Point 'tokenizer_dir' at a CLIP tokenizer folder, or leave it empty.",
            )
        return folder
    for folder in _hub_cache_candidates():
        if _has_tokenizer(folder):
            return folder
    if _has_tokenizer(cache_dir):
        return cache_dir
    bpe = open_clip_vocabulary()
    if bpe is None:
        raise ModelFormatError(
            "No CLIP tokenizer was found: not in 'tokenizer_dir', not in the Hugging Face cache, and open_clip_torch "
            "is not installed.",
            "Install open_clip_torch (`pip install --no-deps open_clip_torch`), or set 'tokenizer_dir' to a folder "
            "with vocab.json and merges.txt of openai/clip-vit-large-patch14.",
        )
    write_clip_tokenizer(bpe, cache_dir)
    return cache_dir


def load_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>"):  # -> transformers.CLIPTokenizer
    """The transformers tokenizer from a folder found by :func:`find_tokenizer_dir` (transformers 4 and 5).

    OpenAI's CLIP (SD 1.x, SDXL's first encoder) pads with end-of-text; OpenCLIP (SD 2.x, SDXL's second) pads
    with '!' (id 0), as the models were trained and as the web UI feeds them."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(
        str(folder),
        local_files_only=True,
        model_max_length=77,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token=pad_token,
    )


def open_clip_vocabulary() -> Path | None:
    """The gzipped BPE merges that open_clip ships, found without importing open_clip (it needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    return path if path.is_file() else None


def write_clip_tokenizer(bpe_gz: Path, folder: Path) -> None:
    """Turn CLIP's gzipped merge list into the ``vocab.json`` + ``merges.txt`` that transformers reads."""
    lines = gzip.decompress(bpe_gz.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : _MERGE_COUNT + 1]
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    ids = {token: i for i, token in enumerate(vocab)}
    vocab_text = json.dumps(ids, ensure_ascii=False)
    merges_text = "#version: 0.2\n" + "\n".join(merges) + "\n"
    write_atomic(folder / "merges.txt", lambda p: p.write_text(merges_text, encoding="utf-8"))
    write_atomic(folder / "vocab.json", lambda p: p.write_text(vocab_text, encoding="utf-8"))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def _has_tokenizer(folder: Path) -> bool:
    return all((folder / name).is_file() for name in TOKENIZER_FILES)


def _hub_cache_candidates() -> list[Path]:
    roots = []
    if os.environ.get("HF_HUB_CACHE"):
        roots.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        roots.append(Path(os.environ["HF_HOME"]) / "hub")
    roots.append(Path.home() / ".cache" / "huggingface" / "hub")
    found = []
    for root in roots:
        snapshots = root / CLIP_REPO_FOLDER / "snapshots"
        if snapshots.is_dir():
            found += sorted(snapshots.iterdir(), reverse=True)
    return found
