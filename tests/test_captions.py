"""Captions: the .txt beside an image, else its file name; and [filewords] in prompts."""

from __future__ import annotations

import codecs
from pathlib import Path

import pytest

from dreambooth.data.captions import caption_for, caption_from_name, expand_prompt
from dreambooth.errors import DatasetError


def test_text_file_beside_the_image_wins(tmp_path: Path) -> None:
    image = tmp_path / "IMG_0001.jpg"
    image.write_bytes(b"")  # captions never open the image itself
    (tmp_path / "IMG_0001.txt").write_text("  a man\n\twearing a red   hat \r\n", encoding="utf-8")
    assert caption_for(image) == "a man wearing a red hat"


def test_byte_order_marks_are_tolerated(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(codecs.BOM_UTF8 + "café au lait".encode())
    assert caption_for(tmp_path / "a.png") == "café au lait"
    (tmp_path / "b.txt").write_bytes("smiling, outdoors".encode("utf-16"))  # Notepad's "Unicode"
    assert caption_for(tmp_path / "b.png") == "smiling, outdoors"


def test_stem_with_dots_keeps_its_caption(tmp_path: Path) -> None:
    (tmp_path / "v1.2 portrait.txt").write_text("portrait in a garden")
    assert caption_for(tmp_path / "v1.2 portrait.webp") == "portrait in a garden"


def test_empty_text_file_means_an_empty_caption(tmp_path: Path) -> None:
    (tmp_path / "zwx_dog.txt").write_text("\n")
    assert caption_for(tmp_path / "zwx_dog.jpg") == ""


def test_text_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    caption = tmp_path / "photo.txt"
    caption.write_bytes("café".encode("cp1252"))
    with pytest.raises(DatasetError, match="not UTF-8") as err:
        caption_for(tmp_path / "photo.jpg")
    assert str(caption) in err.value.message and "UTF-8" in err.value.advice


@pytest.mark.parametrize("name, caption", [
    ("zwx_person-smiling (1).jpg", "zwx person smiling"),
    ("portrait_01.png", "portrait"),
    ("dog on a beach - Copy (2).jpeg", "dog on a beach"),
    ("cat copy 2.png", "cat"),
    ("red_car_12 (3).webp", "red car"),
    ("close-up.bmp", "close up"),
    ("0001.jpg", "0001"),  # nothing but a number: kept rather than emptied
    ("a__b.jpg", "a b"),
])
def test_caption_from_the_file_name(tmp_path: Path, name: str, caption: str) -> None:
    assert caption_for(tmp_path / name) == caption


def test_caption_from_name_alone() -> None:
    assert caption_from_name("zwx_dog (2)") == "zwx dog"


def test_expand_prompt_replaces_filewords() -> None:
    assert expand_prompt("photo of zwx person, [filewords]", "smiling, red hat") == \
        "photo of zwx person, smiling, red hat"
    assert expand_prompt("[filewords] by zwx", "a castle") == "a castle by zwx"


def test_expand_prompt_without_filewords_is_unchanged() -> None:
    template = "photo of  zwx person"
    assert expand_prompt(template, "ignored") == template


@pytest.mark.parametrize("template, expected", [
    ("photo of zwx person, [filewords]", "photo of zwx person"),
    ("[filewords], photo of zwx", "photo of zwx"),
    ("zwx, [filewords], studio light", "zwx, studio light"),
    ("photo of [filewords] zwx", "photo of zwx"),
    ("[filewords]", ""),
])
def test_expand_prompt_with_an_empty_caption_leaves_no_dangling_commas(template: str, expected: str) -> None:
    assert expand_prompt(template, "") == expected
