"""Find, check and decode training images: any mode, any orientation, any size, with a clear word on bad files.

Every image comes out as an RGB picture no larger than ``MAX_DECODE_SIDE`` on its long side. Files that
cannot be used raise a ``DatasetError`` naming the file, saying what is wrong and what to do.

Pillow's process-wide settings are left untouched, because the web UI process shares them:
``Image.MAX_IMAGE_PIXELS`` is not consulted (we identify the file through Pillow's format registry, which
skips that check, and apply our own limit of ``MAX_PIXELS``) and ``ImageFile.LOAD_TRUNCATED_IMAGES`` is
never set, so a cut-off file fails loudly while it is decoded (as long as nothing else in the process set
that flag to ``True``; the training process is a fresh one where it is ``False``).
"""

from __future__ import annotations

import hashlib
import math
import random
import struct
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import BmpImagePlugin, Image, ImageFile, JpegImagePlugin, PngImagePlugin  # noqa: F401 (registers formats)

try:  # Pillow is built with WebP almost everywhere; without it .webp files are reported as unreadable.
    from PIL import WebPImagePlugin  # noqa: F401
except ImportError:  # pragma: no cover - depends on how Pillow was built
    pass

from ..errors import DatasetError

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp")
MAX_DECODE_SIDE: int = 4096
MAX_PIXELS: int = 1_000_000_000

_OTHER_IMAGE_EXTENSIONS = (".heic", ".heif", ".avif", ".gif", ".tif", ".tiff", ".jxl", ".raw", ".dng",
                           ".cr2", ".nef", ".arw", ".psd", ".svg")
_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
_FORMAT_NAMES = "JPEG, PNG, WebP or BMP"
_LANCZOS = getattr(Image, "Resampling", Image).LANCZOS
_TRANSPOSE = getattr(Image, "Transpose", Image)
_ORIENTATION_TAG = 0x0112
# What ImageOps.exif_transpose does for each EXIF orientation, applied here to the already reduced picture.
_ORIENTATIONS = {
    2: _TRANSPOSE.FLIP_LEFT_RIGHT,
    3: _TRANSPOSE.ROTATE_180,
    4: _TRANSPOSE.FLIP_TOP_BOTTOM,
    5: _TRANSPOSE.TRANSPOSE,
    6: _TRANSPOSE.ROTATE_270,
    7: _TRANSPOSE.TRANSVERSE,
    8: _TRANSPOSE.ROTATE_90,
}
# What Pillow raises for files that are damaged, cut off or not what their header claims.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error, zlib.error,
                  Image.DecompressionBombError)
_SIGNATURES = (
    (b"GIF8", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"\xff\x0a", "a JPEG XL image"),
    (b"\x00\x00\x00\x0cJXL ", "a JPEG XL image"),
    (b"%PDF", "a PDF document"),
    (b"<!doctype html", "a web page (often what a failed download saves)"),
    (b"<html", "a web page (often what a failed download saves)"),
    (b"<?xml", "an XML or SVG file"),
    (b"<svg", "an SVG drawing"),
    (b"PK\x03\x04", "a ZIP archive"),
)
_RESAVE = "Open it in an image editor and save it again, or remove it from the folder."
_RECOPY = "Copy it again from where it came from, or open it in an image editor and save it again, or remove it."


class _Unusable(Exception):
    """Why one file cannot be used: ``reason`` reads after the file name ("x.png is empty (0 bytes)")."""

    def __init__(self, reason: str, advice: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.advice = advice


def list_images(folder: str | Path, role: str) -> list[Path]:
    """Return the image files directly in ``folder``, sorted by name without regard to case.

    Hidden files (names starting with ".", such as macOS "._photo.jpg") and files of other types are
    skipped; sub-folders are not searched. ``role`` names the set in messages, e.g. "instance images".
    Raises ``DatasetError`` when the folder is not set, missing, not a folder, unreadable or holds no image.
    """
    if not str(folder).strip():
        raise DatasetError(f"No folder is set for the {role}.", f"Choose the folder that holds the {role}.")
    path = Path(folder)
    if not path.exists():
        raise DatasetError(f"The folder for the {role} does not exist: {path}",
                           "Check the path for typing errors; a relative path counts from the folder the "
                           "program was started in, so prefer a full path.")
    if not path.is_dir():
        raise DatasetError(f"The path given for the {role} is a file, not a folder: {path}",
                           f"Give the folder that holds the {role}, not a single file.")
    try:
        entries = [entry for entry in path.iterdir() if not entry.name.startswith(".")]
    except OSError as exc:
        raise DatasetError(f"The folder for the {role} cannot be read: {path} ({exc.strerror or exc}).",
                           "Check that your user may open this folder.") from exc
    images = [entry for entry in entries if entry.suffix.lower() in IMAGE_EXTENSIONS and entry.is_file()]
    if not images:
        advice = f"Put {_extension_list()} files directly in this folder (sub-folders are not searched)."
        convertible = sorted({entry.suffix.lower() for entry in entries} & set(_OTHER_IMAGE_EXTENSIONS))
        if convertible:
            advice += f" Convert {' and '.join(convertible)} pictures to JPEG or PNG first."
        raise DatasetError(f"The folder for the {role} holds no images: {path}{_describe_others(entries)}", advice)
    return sorted(images, key=lambda entry: (entry.name.casefold(), entry.name))


def load_image(path: Path, min_side: int) -> Image.Image:
    """Decode ``path`` into an RGB image, upright and at most ``MAX_DECODE_SIDE`` pixels on its long side.

    EXIF orientation is applied; CMYK, grey, 1-bit, palette and 16-bit images are converted (16-bit values
    are scaled, not clipped); transparent areas become white. Large JPEGs are decoded at 1/2, 1/4 or 1/8
    scale straight from the file (``Image.draft``), other formats are shrunk by a whole factor right after
    decoding (``Image.reduce``). Raises ``DatasetError`` naming the file when it is empty, damaged, cut off,
    not an image, larger than ``MAX_PIXELS`` or smaller than ``min_side`` on its shorter side.
    """
    path = Path(path)
    try:
        return _load(path, min_side)
    except _Unusable as bad:
        raise DatasetError(f"{path} {bad.reason}.", bad.advice) from None


def check_images(paths: list[Path], min_side: int) -> None:
    """Decode every file in ``paths`` and raise one ``DatasetError`` listing all unusable ones with reasons.

    JPEGs are decoded at 1/8 scale, which still reads the whole file, so this finds cut-off files as well
    as wrong sizes at a fraction of the cost of ``load_image``.
    """
    problems: list[tuple[Path, _Unusable]] = []
    for path in paths:
        path = Path(path)
        try:
            with _opened(path) as image:
                _check_size(image, min_side)
                image.draft(None, (max(1, image.width // 8), max(1, image.height // 8)))
                _decode(image)
        except _Unusable as bad:
            problems.append((path, bad))
    if not problems:
        return
    count = "1 image cannot" if len(problems) == 1 else f"{len(problems)} images cannot"
    lines = "\n".join(f"  {path} {bad.reason}." for path, bad in problems)
    raise DatasetError(f"{count} be used for training:\n{lines}\n",
                       "Fix or remove every file listed, then start again: copy empty or cut-off files again, "
                       "re-save damaged ones from an image editor, and replace pictures that are too small.")


def fit_square(image: Image.Image, resolution: int, center_crop: bool, rng: random.Random) -> Image.Image:
    """Scale ``image`` so that its shorter side is ``resolution`` (Lanczos), then cut a square from it.

    The square is taken from the centre, or, when ``center_crop`` is false, at an offset drawn from ``rng``.
    """
    return crop_square(image, resolution, center_crop, rng)[0]


def crop_square(
    image: Image.Image, resolution: int, center_crop: bool, rng: random.Random
) -> tuple[Image.Image, tuple[int, int]]:
    """:func:`fit_square`, also returning the crop's top-left corner ``(top, left)`` in the scaled image."""
    return crop_to(image, (resolution, resolution), center_crop, rng)


def cover_size(width: int, height: int, size: tuple[int, int]) -> tuple[int, int]:
    """The (width, height) a ``width`` x ``height`` picture is scaled to, keeping its aspect ratio, to cover ``size``
    ((height, width)) with the least to spare: one side equals the target's, the other is at least its."""
    target_height, target_width = size
    scale = max(target_width / width, target_height / height)
    return max(target_width, round(width * scale)), max(target_height, round(height * scale))


def crop_to(
    image: Image.Image, size: tuple[int, int], center_crop: bool, rng: random.Random
) -> tuple[Image.Image, tuple[int, int]]:
    """Scale ``image`` (Lanczos) to :func:`cover_size` of ``size`` ((height, width)) and cut that size from it: from
    the centre, or, when ``center_crop`` is false, at an offset drawn from ``rng`` (left, then top). Returns the
    crop and its top-left corner ``(top, left)`` in the scaled image."""
    height, width = size
    scaled = cover_size(image.width, image.height, size)
    if scaled != image.size:
        image = image.resize(scaled, _LANCZOS)
    spare_x, spare_y = scaled[0] - width, scaled[1] - height
    if center_crop:
        left, top = spare_x // 2, spare_y // 2
    else:
        left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
    if (spare_x, spare_y) == (0, 0):
        return image, (0, 0)
    return image.crop((left, top, left + width, top + height)), (top, left)


def upright_size(path: Path) -> tuple[int, int]:
    """The (height, width) of the picture ``load_image`` gives, before its shrinking to ``MAX_DECODE_SIDE``, read from
    the file's header (EXIF orientation applied) without decoding it. Raises ``DatasetError`` for an unusable file."""
    path = Path(path)
    try:
        with _opened(path) as image:
            width, height = image.size
            if _orientation(image) in (5, 6, 7, 8):  # a quarter turn
                width, height = height, width
    except _Unusable as bad:
        raise DatasetError(f"{path} {bad.reason}.", bad.advice) from None
    return height, width


def to_tensor(image: Image.Image) -> torch.Tensor:
    """Return the RGB pixels of ``image`` as float32 ``[3, H, W]`` scaled from 0..255 to -1..1."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
    return pixels.permute(2, 0, 1).to(torch.float32).div_(127.5).sub_(1.0).contiguous()


def image_digest(path: Path) -> str:
    """Return the SHA-256 (hex) of the file's bytes, a key for caches that must notice edited images."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- decoding ------------------------------------------------------------------------------------------


def _load(path: Path, min_side: int) -> Image.Image:
    with _opened(path) as image:
        _check_size(image, min_side)
        _draft(image)
        _decode(image)
        orientation = _orientation(image)
        picture = _flatten(_shrink(_working_mode(image)))  # often ``image`` itself: decoded, needs no file
        if min(picture.size) < min_side:  # only a very long, narrow picture gets here, after shrinking
            raise _Unusable(f"is {image.width}x{image.height} pixels, too long and narrow: reduced to "
                            f"{MAX_DECODE_SIDE} pixels on the long side, its shorter side is below {min_side} pixels",
                            "Crop it to a less elongated shape, or remove it from the folder.")
    if orientation in _ORIENTATIONS:
        picture = picture.transpose(_ORIENTATIONS[orientation])
    return picture


@contextmanager
def _opened(path: Path) -> Iterator[ImageFile.ImageFile]:
    """Open and identify ``path`` as one of ``_FORMATS``, not yet decoded; close the file on exit.

    Formats are tried through Pillow's registry (``Image.OPEN``) rather than ``Image.open``, which would
    apply the process-wide ``Image.MAX_IMAGE_PIXELS`` check; ``_check_size`` applies ours instead.
    """
    with ExitStack() as stack:
        try:
            if path.stat().st_size == 0:
                raise _Unusable("is empty (0 bytes)",
                                "Copy the image again from where it came from, or remove it from the folder.")
            handle = stack.enter_context(open(path, "rb"))
        except OSError as exc:
            raise _Unusable(f"cannot be read ({exc.strerror or exc})",
                            "Check that the file exists and that your user may open it.") from None
        yield _identify(handle, path)


def _identify(handle: BinaryIO, path: Path) -> ImageFile.ImageFile:
    prefix = handle.read(16)
    for name in _FORMATS:
        entry = Image.OPEN.get(name)
        if entry is None:
            continue
        factory, accept = entry
        verdict = accept(prefix) if accept else True
        if isinstance(verdict, str):  # Pillow's word for a format it knows but cannot decode in this build
            raise _Unusable(f"cannot be opened ({verdict})", "Convert it to JPEG or PNG.")
        if not verdict:
            continue
        handle.seek(0)
        try:
            return factory(handle, str(path))
        except Image.DecompressionBombError:
            raise _Unusable(f"is larger than Pillow {Image.__version__} opens as {name}",
                            "Scale it down (or save it as JPEG or PNG) and try again.") from None
        except _DECODE_ERRORS as exc:
            raise _Unusable(f"is damaged or cut off: it cannot be read as {name} ({exc})", _RESAVE) from None
    kind = _sniff(prefix)
    if kind:
        raise _Unusable(f"is not a {_FORMAT_NAMES} image: it is {kind} with the name of an image",
                        "Convert it to JPEG or PNG, or remove it from the folder.")
    raise _Unusable(f"is not a {_FORMAT_NAMES} image (it may be another kind of file with an image's name)",
                    "Remove it from the folder, or convert it to JPEG or PNG.")


def _sniff(prefix: bytes) -> str:
    """Name the kind of a file we do not decode from its first bytes ("a HEIC photo"), or return ""."""
    if prefix[4:8] == b"ftyp":
        brand = prefix[8:12]
        if brand in (b"heic", b"heix", b"hevc", b"mif1", b"msf1", b"heim", b"heis"):
            return "a HEIC/HEIF photo (the iPhone's format)"
        if brand in (b"avif", b"avis"):
            return "an AVIF image"
        return "a video or MP4-family file"
    lowered = prefix.lstrip().lower()
    for signature, kind in _SIGNATURES:
        if prefix.startswith(signature) or lowered.startswith(signature):
            return kind
    return ""


def _check_size(image: Image.Image, min_side: int) -> None:
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise _Unusable(f"is {width}x{height} pixels ({width * height / 1e6:.0f} megapixels); images over "
                        f"{MAX_PIXELS // 1_000_000} megapixels are refused",
                        f"Scale it down to at most {MAX_DECODE_SIDE} pixels on the long side.")
    if min(width, height) < min_side:
        raise _Unusable(f"is {width}x{height} pixels; images must be at least {min_side} pixels on the shorter side",
                        "Use a larger picture, or remove it from the folder. Training upscales images to the "
                        "resolution, so pictures near it or larger give the best results.")


def _draft(image: ImageFile.ImageFile) -> None:
    """Ask the JPEG decoder for the smallest 1/2, 1/4 or 1/8 scale that still fits ``MAX_DECODE_SIDE``."""
    if image.format not in ("JPEG", "MPO") or max(image.size) <= MAX_DECODE_SIDE:
        return
    scale = next((s for s in (2, 4, 8) if math.ceil(max(image.size) / s) <= MAX_DECODE_SIDE), 8)
    # draft() picks the largest scale s with size // requested >= s; floor division keeps that at ours.
    image.draft(None, (image.width // scale, image.height // scale))


def _decode(image: ImageFile.ImageFile) -> None:
    try:
        image.load()
    except _DECODE_ERRORS as exc:
        raise _Unusable(f"is damaged or cut off: the {image.format} data cannot be decoded ({exc})",
                        _RECOPY) from None


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8), or 1 when there is none or the EXIF block is unreadable."""
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
    except _DECODE_ERRORS + (KeyError,):
        return 1
    return value if isinstance(value, int) else 1


def _working_mode(image: Image.Image) -> Image.Image:
    """Convert to L, LA, RGB or RGBA: modes that ``Image.reduce`` averages correctly."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey (PNG): 0..65535 to 0..255, rounded; Pillow's own convert clips instead of scaling.
        values = np.asarray(image).astype(np.uint32)
        return Image.fromarray(((np.clip(values, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8), "L")
    if mode == "F":
        return Image.fromarray(np.clip(np.asarray(image), 0, 255).round().astype(np.uint8), "L")
    if mode in ("L", "RGB", "P") and "transparency" in image.info:
        return image.convert("RGBA")
    if mode in ("L", "LA", "RGB", "RGBA"):
        return image
    if mode == "1":
        return image.convert("L")
    if mode in ("PA", "RGBa", "La"):
        return image.convert("RGBA" if mode != "La" else "LA")
    return image.convert("RGB")  # P without transparency, CMYK, YCbCr, LAB, HSV


def _shrink(image: Image.Image) -> Image.Image:
    """Reduce by the smallest whole factor that brings the long side to ``MAX_DECODE_SIDE`` or less."""
    factor = math.ceil(max(image.size) / MAX_DECODE_SIDE)
    return image.reduce(factor) if factor > 1 else image


def _flatten(image: Image.Image) -> Image.Image:
    """Composite any transparency over white and return RGB."""
    if image.mode in ("LA", "RGBA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        rgba = image.convert("RGBA")
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB") if image.mode != "RGB" else image


def _extension_list() -> str:
    return ", ".join(IMAGE_EXTENSIONS[:-1]) + " or " + IMAGE_EXTENSIONS[-1]


def _describe_others(entries: list[Path]) -> str:
    """A short note on what the folder holds instead of images, e.g. " (it holds 3 .txt files, 1 folder)"."""
    folders = sum(1 for entry in entries if entry.is_dir())
    suffixes: dict[str, int] = {}
    for entry in entries:
        if not entry.is_dir():
            key = entry.suffix.lower() or "extension-less"
            suffixes[key] = suffixes.get(key, 0) + 1
    parts = [f"{count} {suffix} file{'s' if count > 1 else ''}" for suffix, count in sorted(suffixes.items())]
    if folders:
        parts.append(f"{folders} sub-folder{'s' if folders > 1 else ''}")
    return f" (it holds {', '.join(parts)})." if parts else " (it is empty)."
