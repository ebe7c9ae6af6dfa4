"""Captions for training images: a .txt file beside the image, else the image's file name, and [filewords]."""

from __future__ import annotations

import codecs
import re
from pathlib import Path

from ..config import FILEWORDS
from ..errors import DatasetError

# Trailing copy counters that file managers and cameras add: "photo (1)", "photo_01", "photo-2", "photo 3",
# "photo - Copy", "photo copy 2". Removed repeatedly from the end, so "photo_01 (2)" becomes "photo".
_COUNTER = re.compile(r"(?:\s*\(\d+\)|[\s_-]+\d{1,4}|\s*-\s*copy|\s+copy)$", re.IGNORECASE)
_SEPARATORS = re.compile(r"[_-]+")
_EMPTY_LIST_ITEMS = re.compile(r"\s*,(?:\s*,)+")
_SPACES = re.compile(r" {2,}")
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def caption_for(image_path: Path) -> str:
    """Return the caption of ``image_path``: its .txt file's text, else its file name made readable.

    The .txt file has the image's stem ("cat_01.png" → "cat_01.txt"); it is read as UTF-8 (with or without a
    byte-order mark; UTF-16 with a mark is accepted too) and its whitespace, line breaks included, is
    collapsed to single spaces. Without one, the stem is used with "_" and "-" turned into spaces and
    trailing copy counters such as "(1)", "_01" or " - Copy" removed. Raises ``DatasetError`` naming the
    .txt file when it cannot be read or is not UTF-8 text.
    """
    image_path = Path(image_path)
    text_path = _caption_file(image_path)
    if text_path is not None:
        return " ".join(_read_text(text_path).split())
    return caption_from_name(image_path.stem)


def caption_from_name(stem: str) -> str:
    """Turn a file stem into a caption: separators to spaces, copy counters dropped ("zwx_dog (2)" → "zwx dog")."""
    cleaned = stem
    while True:
        shorter = _COUNTER.sub("", cleaned)
        if shorter == cleaned or not shorter.strip(" _-"):
            break
        cleaned = shorter
    return " ".join(_SEPARATORS.sub(" ", cleaned).split())


def expand_prompt(template: str, caption: str) -> str:
    """Replace "[filewords]" in ``template`` with ``caption``; a template without it is returned unchanged.

    When the caption is empty, the commas and spaces the placeholder leaves behind are tidied, so that
    "photo of zwx, [filewords]" becomes "photo of zwx" rather than "photo of zwx, ".
    """
    if FILEWORDS not in template:
        return template
    if caption.strip():
        return template.replace(FILEWORDS, caption)
    text = _EMPTY_LIST_ITEMS.sub(",", template.replace(FILEWORDS, ""))
    return _SPACES.sub(" ", text).strip(" ,")


def _caption_file(image_path: Path) -> Path | None:
    for suffix in (".txt", ".TXT", ".Txt"):
        candidate = image_path.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"The caption file {path} cannot be read ({exc.strerror or exc}).",
                           "Check that your user may open it, or remove it to caption the image by its name.") from exc
    try:
        if data.startswith(_UTF16_BOMS):
            return data.decode("utf-16")
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"The caption file {path} is not UTF-8 text (byte {exc.start} cannot be read).",
                           "Open it in a text editor and save it with the encoding 'UTF-8'.") from exc
