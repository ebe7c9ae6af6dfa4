"""Image folders and image files, good and bad: every file here is written by the test itself with PIL."""

from __future__ import annotations

import hashlib
import os
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps

from dreambooth.data.images import (
    IMAGE_EXTENSIONS,
    MAX_DECODE_SIDE,
    check_images,
    fit_square,
    image_digest,
    list_images,
    load_image,
    to_tensor,
)
from dreambooth.errors import DatasetError

REPO = Path(__file__).resolve().parents[1]


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB picture of random pixels: compresses badly, so cutting its file in half loses image data."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


# --- list_images ---------------------------------------------------------------------------------------


def test_missing_folder_names_folder_and_role(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as err:
        list_images(missing, "instance images")
    assert str(missing) in err.value.message and "instance images" in err.value.message
    assert "does not exist" in err.value.message and err.value.advice


def test_a_file_instead_of_a_folder(tmp_path: Path) -> None:
    file = tmp_path / "photo.jpg"
    noise(16, 16).save(file)
    with pytest.raises(DatasetError, match="is a file, not a folder") as err:
        list_images(file, "class images")
    assert str(file) in err.value.message and "class images" in err.value.message


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="holds no images") as err:
        list_images(tmp_path, "instance images")
    assert str(tmp_path) in err.value.message and "(it is empty)" in err.value.message
    assert all(extension in err.value.advice for extension in IMAGE_EXTENSIONS)


def test_folder_with_only_captions_and_a_sub_folder(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a caption")
    (tmp_path / "b.txt").write_text("another")
    (tmp_path / "photos").mkdir()
    noise(16, 16).save(tmp_path / "photos" / "inside.png")
    with pytest.raises(DatasetError) as err:
        list_images(tmp_path, "instance images")
    assert "2 .txt files" in err.value.message and "1 sub-folder" in err.value.message
    assert ".webp" in err.value.advice and "sub-folders are not searched" in err.value.advice


def test_lists_images_sorted_without_case_skipping_hidden_and_other_files(tmp_path: Path) -> None:
    for name in ("b.PNG", "A.jpg", "c.webp", "d.Jpeg", "e.bmp", "._A.jpg", ".hidden.png"):
        noise(16, 16).save(tmp_path / name, format={"png": "PNG", "webp": "WEBP", "bmp": "BMP"}.get(
            name.rsplit(".", 1)[1].lower(), "JPEG"))
    (tmp_path / "A.txt").write_text("caption")
    (tmp_path / "notes.gif").write_bytes(b"GIF89a")
    (tmp_path / "folder.png").mkdir()
    found = list_images(str(tmp_path), "instance images")
    assert [path.name for path in found] == ["A.jpg", "b.PNG", "c.webp", "d.Jpeg", "e.bmp"]
    assert all(isinstance(path, Path) for path in found)


# --- load_image: files that cannot be used -------------------------------------------------------------


def test_zero_byte_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(DatasetError, match=r"is empty \(0 bytes\)") as err:
        load_image(empty, 8)
    assert str(empty) in err.value.message and err.value.advice


@pytest.mark.parametrize("format_, suffix", [("JPEG", ".jpg"), ("PNG", ".png")])
def test_truncated_file(tmp_path: Path, format_: str, suffix: str) -> None:
    whole = tmp_path / f"whole{suffix}"
    noise(96, 96).save(whole, format=format_)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert load_image(whole, 8).size == (96, 96)
    with pytest.raises(DatasetError, match="cut off") as err:
        load_image(cut, 8)
    assert str(cut) in err.value.message and format_ in err.value.message
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_text_file_with_an_image_name(tmp_path: Path) -> None:
    fake = tmp_path / "x.png"
    fake.write_text("this is not a picture\n")
    with pytest.raises(DatasetError, match="is not a JPEG, PNG, WebP or BMP image") as err:
        load_image(fake, 8)
    assert str(fake) in err.value.message


@pytest.mark.parametrize("name, content, kind", [
    ("animation.png", None, "it is a GIF image"),
    ("download.jpg", b"<!DOCTYPE html><html><body>403 Forbidden</body></html>", "it is a web page"),
    ("IMG_0001.jpg", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", "it is a HEIC/HEIF photo"),
])
def test_other_kinds_of_file_are_named(tmp_path: Path, name: str, content: bytes | None, kind: str) -> None:
    path = tmp_path / name
    if content is None:
        Image.new("P", (16, 16)).save(path, format="GIF")
    else:
        path.write_bytes(content)
    with pytest.raises(DatasetError, match=kind) as err:
        load_image(path, 8)
    assert str(path) in err.value.message and "JPEG or PNG" in err.value.advice


def test_folder_of_iphone_photos_says_to_convert_them(tmp_path: Path) -> None:
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (tmp_path / "IMG_0002.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    with pytest.raises(DatasetError, match=r"2 \.heic files") as err:
        list_images(tmp_path, "instance images")
    assert "Convert .heic pictures to JPEG or PNG first" in err.value.advice


def test_damaged_header(tmp_path: Path) -> None:
    noise(32, 32).save(tmp_path / "ok.png")
    data = bytearray((tmp_path / "ok.png").read_bytes())
    broken = tmp_path / "broken.png"
    data[20] ^= 0xFF  # inside IHDR: its checksum no longer matches
    broken.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="damaged") as err:
        load_image(broken, 8)
    assert str(broken) in err.value.message


def test_too_small_image_names_the_minimum(tmp_path: Path) -> None:
    tiny = tmp_path / "tiny.png"
    noise(8, 8).save(tiny)
    with pytest.raises(DatasetError) as err:
        load_image(tiny, 64)
    assert err.value.message.startswith(str(tiny))
    assert "is 8x8 pixels; images must be at least 64 pixels on the shorter side" in err.value.message
    assert load_image(tiny, 8).size == (8, 8)


def test_very_long_narrow_image_is_refused_when_reduction_would_make_it_too_thin(tmp_path: Path) -> None:
    strip = tmp_path / "strip.png"
    Image.new("RGB", (20000, 100), (5, 5, 5)).save(strip)  # reduced by 5 to fit 4096: 4000x20
    with pytest.raises(DatasetError, match="too long and narrow") as err:
        load_image(strip, 64)
    assert str(strip) in err.value.message and "20000x100 pixels" in err.value.message
    assert load_image(strip, 16).size == (4000, 20)


def test_absurdly_large_image_is_refused_before_decoding(tmp_path: Path) -> None:
    # A valid PNG header announcing 40000 x 30000 pixels (1.2 gigapixels) with almost no data behind it.
    header = struct.pack(">IIBBBBB", 40000, 30000, 8, 2, 0, 0, 0)
    absurd = tmp_path / "absurd.png"
    absurd.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
                       + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b""))
    with pytest.raises(Image.DecompressionBombError, match="1200000000 pixels"):
        Image.open(absurd)  # the file really announces that size; Pillow's own message says little to a user
    with pytest.raises(DatasetError, match="40000x30000 pixels .1200 megapixels.") as err:
        load_image(absurd, 8)
    assert str(absurd) in err.value.message
    with pytest.raises(DatasetError, match="1200 megapixels"):
        check_images([absurd], 8)


# --- load_image: modes, orientation, size --------------------------------------------------------------


@pytest.mark.parametrize("format_, suffix", [("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp"), ("BMP", ".bmp")])
def test_every_supported_format_loads_as_rgb(tmp_path: Path, format_: str, suffix: str) -> None:
    path = tmp_path / f"flat{suffix}"
    Image.new("RGB", (48, 32), (200, 30, 60)).save(path, format=format_)
    image = load_image(path, 32)
    assert (image.mode, image.size) == ("RGB", (48, 32))
    assert np.abs(np.asarray(image, dtype=int)[16, 24] - (200, 30, 60)).max() <= 6


def test_png_content_behind_a_jpg_name_loads(tmp_path: Path) -> None:
    path = tmp_path / "really_a_png.jpg"
    Image.new("RGB", (20, 20), (1, 2, 3)).save(path, format="PNG")
    assert load_image(path, 8).getpixel((0, 0)) == (1, 2, 3)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(path, quality=95)  # cyan 0, magenta+yellow full: red
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    image = load_image(path, 8)
    assert image.mode == "RGB"
    assert np.abs(np.asarray(image, dtype=int)[16, 16] - (255, 0, 0)).max() <= 8


def test_rgba_png_transparent_becomes_white(tmp_path: Path) -> None:
    picture = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent red: must not show as red
    picture.paste((0, 0, 255, 255), (0, 0, 16, 32))  # left half opaque blue
    picture.paste((0, 0, 0, 128), (16, 0, 32, 8))  # a half-transparent black strip
    path = tmp_path / "rgba.png"
    picture.save(path)
    image = load_image(path, 8)
    assert image.mode == "RGB"
    assert image.getpixel((4, 4)) == (0, 0, 255)
    assert image.getpixel((24, 24)) == (255, 255, 255)
    assert all(abs(value - 127) <= 1 for value in image.getpixel((24, 4)))


def test_grey_with_alpha_becomes_white_where_transparent(tmp_path: Path) -> None:
    picture = Image.new("LA", (16, 16), (0, 0))
    picture.paste((50, 255), (0, 0, 8, 16))
    path = tmp_path / "la.png"
    picture.save(path)
    image = load_image(path, 8)
    assert image.getpixel((2, 2)) == (50, 50, 50) and image.getpixel((12, 2)) == (255, 255, 255)


def test_palette_png_with_transparency(tmp_path: Path) -> None:
    picture = Image.new("P", (16, 16), 0)
    picture.putpalette([0, 0, 0, 0, 160, 0] + [0] * (254 * 3))  # index 0 black (transparent), 1 green
    picture.paste(1, (0, 0, 8, 16))
    path = tmp_path / "palette.png"
    picture.save(path, transparency=0)
    with Image.open(path) as raw:
        assert raw.mode == "P" and "transparency" in raw.info
    image = load_image(path, 8)
    assert image.getpixel((2, 2)) == (0, 160, 0)
    assert image.getpixel((12, 2)) == (255, 255, 255)  # not black


def test_palette_png_without_transparency(tmp_path: Path) -> None:
    picture = Image.new("P", (16, 16), 1)
    picture.putpalette([0, 0, 0, 10, 20, 30] + [0] * (254 * 3))
    path = tmp_path / "plain_palette.png"
    picture.save(path)
    assert load_image(path, 8).getpixel((5, 5)) == (10, 20, 30)


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.zeros((16, 16), dtype=np.uint16)
    values[0, 0], values[0, 1], values[0, 2], values[0, 3] = 65535, 128 * 257, 257, 1000
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert path.read_bytes()[24] == 16  # IHDR bit depth: the file really holds 16-bit samples
    image = load_image(path, 8)
    assert image.mode == "RGB"
    assert [image.getpixel((x, 0)) for x in range(4)] == [(255,) * 3, (128,) * 3, (1,) * 3, (4,) * 3]
    assert image.getpixel((5, 5)) == (0, 0, 0)


def test_1_bit_image(tmp_path: Path) -> None:
    picture = Image.new("1", (16, 16), 0)
    picture.paste(1, (8, 0, 16, 16))
    path = tmp_path / "bits.png"
    picture.save(path)
    image = load_image(path, 8)
    assert image.getpixel((2, 2)) == (0, 0, 0) and image.getpixel((12, 2)) == (255, 255, 255)


def test_exif_orientation_6_is_applied(tmp_path: Path) -> None:
    stored = Image.new("RGB", (64, 32), (255, 255, 255))  # stored landscape ...
    stored.paste((255, 0, 0), (0, 0, 16, 16))  # ... with a red block in its top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif.tobytes(), quality=95)
    image = load_image(path, 8)
    assert image.size == (32, 64)  # shown portrait
    assert image.getpixel((28, 4))[0] > 200 and image.getpixel((28, 4))[1] < 60  # red is now top-right
    assert image.getpixel((4, 4)) == (255, 255, 255) or min(image.getpixel((4, 4))) > 240
    with Image.open(path) as raw:
        expected = np.asarray(ImageOps.exif_transpose(raw).convert("RGB"))
    assert np.array_equal(np.asarray(image), expected)  # the same as Pillow's own exif_transpose


def test_large_png_is_reduced_without_touching_pillows_global_limit(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    picture = Image.new("RGB", (10000, 600), (10, 200, 30))
    picture.paste((250, 250, 0), (9000, 0, 10000, 600))
    path = tmp_path / "panorama.png"
    picture.save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # as if the process had a strict limit
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)  # Pillow's own opener refuses it at this limit ...
    image = load_image(path, 64)  # ... we do not, and leave the limit as it was
    assert Image.MAX_IMAGE_PIXELS == 1_000_000
    assert image.size == (3334, 200) and max(image.size) <= MAX_DECODE_SIDE
    assert image.getpixel((10, 100)) == (10, 200, 30) and image.getpixel((3300, 100)) == (250, 250, 0)
    check_images([path], 64)


_MEMORY = """
import sys
from pathlib import Path
path, how = Path(sys.argv[1]), sys.argv[2]
if how == "ours":
    from dreambooth.data.images import load_image
else:
    import warnings
    from PIL import Image
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # 108 megapixels: Pillow warns, we know
def status(key):  # kB, from the kernel's view of this process only (ru_maxrss can inherit the parent's peak)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))
resident = status("VmRSS")
image = load_image(path, 64) if how == "ours" else Image.open(path).convert("RGB")
print(image.size[0], image.size[1], round((status("VmHWM") - resident) / 1024))  # MiB
"""


def _python(code: str, *args: str) -> subprocess.Popen:
    """Start ``code`` in a fresh Python that can import this checkout; its stdout is piped."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, text=True)


def _printed(process: subprocess.Popen) -> list[str]:
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0
    return out.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="memory is read from /proc (Linux)")
def test_huge_jpeg_is_decoded_small_and_cheaply(tmp_path: Path) -> None:
    path = tmp_path / "camera.jpg"
    # Made in another process, so that the 324 MB picture does not stay in this one's memory.
    _printed(_python("import sys; from PIL import Image; "
                     "Image.new('RGB', (12000, 9000), (40, 120, 200)).save(sys.argv[1], quality=10)", str(path)))
    # Peak minus the resident size just before decoding can only overstate what decoding needs.
    ours, pillow = _python(_MEMORY, str(path), "ours"), _python(_MEMORY, str(path), "pillow")  # side by side
    (width, height, growth), (full_width, full_height, full_growth) = _printed(ours), _printed(pillow)
    print(f"peak memory growth: load_image {growth} MiB to {width}x{height}; Pillow full decode {full_growth} MiB")
    assert max(int(width), int(height)) <= MAX_DECODE_SIDE and int(width) * 3 == int(height) * 4
    assert (full_width, full_height) == ("12000", "9000")
    assert float(full_growth) > 300  # a plain decode: 324 MB of RGB at least
    assert float(growth) < 60 and float(growth) < float(full_growth) / 5


# --- check_images --------------------------------------------------------------------------------------


def test_check_images_lists_every_bad_file_at_once(tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    noise(80, 80).save(good)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    small = tmp_path / "small.png"
    noise(20, 30).save(small)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    check_images([good], 64)  # nothing to say
    with pytest.raises(DatasetError) as err:
        check_images([good, empty, small, cut], 64)
    message = err.value.message
    assert message.startswith("3 images cannot be used for training")
    assert f"{empty} is empty (0 bytes)" in message
    assert f"{small} is 20x30 pixels; images must be at least 64 pixels" in message
    assert f"{cut} is damaged or cut off" in message
    assert str(good) not in message
    assert err.value.advice


# --- fit_square, to_tensor, image_digest ---------------------------------------------------------------


def _columns(width: int, height: int) -> Image.Image:
    """Each column's red value is its x coordinate, so a crop's offset can be read from its pixels."""
    row = np.arange(width, dtype=np.uint8)
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = row
    return Image.fromarray(pixels, "RGB")


def test_fit_square_center_crop(tmp_path: Path) -> None:
    square = fit_square(_columns(200, 100), 100, center_crop=True, rng=random.Random(0))
    assert square.size == (100, 100)
    assert abs(np.asarray(square)[50, 0, 0] - 50) <= 2 and abs(np.asarray(square)[50, 99, 0] - 149) <= 2
    scaled = fit_square(_columns(200, 100), 50, center_crop=True, rng=random.Random(0))
    assert scaled.size == (50, 50)  # shorter side scaled to 50, the long side to 100, then cropped
    tall = fit_square(Image.new("RGB", (30, 90)), 64, center_crop=True, rng=random.Random(0))
    assert tall.size == (64, 64)  # upscaled


def test_fit_square_random_crop_follows_the_rng() -> None:
    picture = _columns(250, 100)
    offsets = []
    for seed in range(8):
        square = fit_square(picture, 100, center_crop=False, rng=random.Random(seed))
        assert square.size == (100, 100)
        offsets.append(int(np.asarray(square)[50, 0, 0]))
        again = fit_square(picture, 100, center_crop=False, rng=random.Random(seed))
        assert np.array_equal(np.asarray(again), np.asarray(square))
    assert len(set(offsets)) > 4 and all(0 <= offset <= 150 for offset in offsets)


def test_to_tensor_range_shape_and_type() -> None:
    picture = Image.new("RGB", (6, 4), (0, 0, 0))
    picture.paste((255, 255, 255), (3, 0, 6, 4))
    picture.putpixel((0, 0), (0, 128, 255))
    tensor = to_tensor(picture)
    assert tensor.shape == (3, 4, 6) and tensor.dtype == torch.float32
    assert tensor.min().item() == -1.0 and tensor.max().item() == 1.0
    assert torch.allclose(tensor[:, 0, 0], torch.tensor([-1.0, 128 / 127.5 - 1, 1.0]), atol=1e-6)
    assert torch.equal(tensor[:, 1, 5], torch.ones(3))


def test_image_digest_is_the_sha256_of_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    noise(16, 16).save(path)
    first = image_digest(path)
    assert first == hashlib.sha256(path.read_bytes()).hexdigest()
    noise(16, 16, seed=1).save(path)
    assert image_digest(path) != first
