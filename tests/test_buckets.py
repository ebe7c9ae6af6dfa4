"""Aspect-ratio buckets: which bucket a photo goes to, batches of one bucket in an order that resumes exactly, the crop
that SDXL's time ids describe, the latent cache per bucket, class images cropped to their step's bucket, and
training end to end on photos of mixed shapes (square photos train exactly as without buckets)."""

from __future__ import annotations

import copy
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth.data import cache as cache_module
from dreambooth.data.buckets import BUCKET_STEP, assign_buckets, bucket_sizes, latent_jobs, nearest_bucket
from dreambooth.data.cache import ImageLatents
from dreambooth.data.dataset import DataOrder, Example
from dreambooth.data.images import crop_to
from dreambooth.engine import run
from dreambooth.events import CANCEL_FILE, Events
from dreambooth.models.conditioning import ImageGeometry
from dreambooth.models.families import family_named
from dreambooth.models.read import read_tensors
from dreambooth.train import loop
from dreambooth.train.speed.layout import compile_blocks

# --- the bucket set and the assignment -------------------------------------------------------------------


def test_sdxl_gets_the_buckets_it_was_trained_on_and_none_needs_more_pixels_than_the_square():
    buckets = bucket_sizes(1024)
    sdxl = [(1024, 1024), (896, 1152), (832, 1216), (768, 1344), (640, 1536)]  # (height, width), landscapes
    assert set(sdxl) | {(w, h) for h, w in sdxl} <= set(buckets)
    for height, width in buckets:
        assert height * width <= 1024 * 1024
        assert 512 <= height <= 2048 and 512 <= width <= 2048
        assert height % BUCKET_STEP == 0 and width % BUCKET_STEP == 0
    assert buckets == sorted({(w, h) for h, w in buckets})  # every portrait has its landscape


def test_the_square_is_always_the_resolution_and_the_only_square():
    assert bucket_sizes(64) == [(64, 64)]  # the demo's size: squares only, as without buckets
    at_520 = bucket_sizes(520)  # not a multiple of 64: the square stays 520, the others are multiples of 64
    assert [b for b in at_520 if b[0] == b[1]] == [(520, 520)]
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in at_520 if h != w)


@pytest.mark.parametrize("photo, bucket", [
    ((4032, 3024), (576, 448)),  # a phone's 4:3 portrait (height, width)
    ((3024, 4032), (448, 576)),  # the same photo held sideways
    ((1080, 1920), (384, 640)),  # 16:9 video frame
    ((1000, 1000), (512, 512)),
    ((1000, 1010), (512, 512)),  # nearly square: the square
    ((1000, 100), (1024, 256)),  # 1:10, narrower than any bucket: the narrowest
    ((100, 1000), (256, 1024)),
])
def test_a_photo_goes_to_the_bucket_of_nearest_aspect_ratio(photo, bucket):
    assert nearest_bucket(photo, bucket_sizes(512)) == bucket


def test_portraits_and_landscapes_of_one_ratio_get_mirrored_buckets():
    buckets = bucket_sizes(768)
    for ratio in (1.1, 1.33, 1.5, 1.78, 2.4, 3.0, 5.0):
        tall = nearest_bucket((round(1000 * ratio), 1000), buckets)
        wide = nearest_bucket((1000, round(1000 * ratio)), buckets)
        assert wide == tall[::-1]
        others = [abs(math.log(h / w) - math.log(ratio)) for h, w in buckets]
        assert abs(math.log(tall[0] / tall[1]) - math.log(ratio)) == min(others)


def test_buckets_are_read_from_the_upright_photo(tmp_path):
    """A phone stores a portrait as a landscape with EXIF orientation 6: it is trained as the portrait it shows."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (120, 90)).save(tmp_path / "phone.jpg", exif=exif.tobytes())
    Image.new("RGB", (120, 90)).save(tmp_path / "plain.jpg")
    Image.new("RGB", (90, 90)).save(tmp_path / "square.png")
    examples = [Example(tmp_path / name, "p") for name in ("phone.jpg", "plain.jpg", "square.png")]
    assert [e.bucket for e in assign_buckets(examples, 512, True)] == [(576, 448), (448, 576), (512, 512)]
    assert [e.bucket for e in assign_buckets(examples, 512, False)] == [(512, 512)] * 3


def test_class_images_are_prepared_at_every_bucket_in_use():
    instance = [Example(Path("a"), "p", (512, 512)), Example(Path("b"), "p", (576, 448)),
                Example(Path("c"), "p", (512, 512))]
    classes = [Example(Path("k1"), "c"), Example(Path("k2"), "c")]
    jobs = latent_jobs(instance, classes)
    assert jobs[:3] == [(Path("a"), (512, 512)), (Path("b"), (576, 448)), (Path("c"), (512, 512))]
    assert sorted(jobs[3:]) == [(Path(k), size) for k in ("k1", "k2") for size in ((512, 512), (576, 448))]


# --- the data order ------------------------------------------------------------------------------------------


def test_every_batch_is_of_one_bucket_and_every_photo_takes_its_turn():
    labels = ["square"] * 5 + ["tall"] * 3 + ["wide"]
    order = DataOrder(len(labels), 4, seed=3, buckets=labels)
    shares = {"square": 3, "tall": 2, "wide": 1}  # batches per round at batch size 2: ceil(images / 2)
    rounds = 5
    drawn: Counter = Counter()
    batches = []
    for _ in range(rounds * sum(shares.values())):
        instance, classes = order.next_batch(2)
        assert len(instance) == len(classes) == 2
        assert len({labels[i] for i in instance}) == 1
        batches.append(labels[instance[0]])
        drawn.update(instance)
    assert Counter(batches) == {name: share * rounds for name, share in shares.items()}
    assert set(drawn) == set(range(len(labels)))
    # within a bucket the photos take turns: none is shown more than once ahead of another of its bucket
    assert max(drawn[i] for i in range(5)) - min(drawn[i] for i in range(5)) <= 1
    assert drawn[8] == 2 * rounds  # alone in its bucket: both places of its batches
    assert len(set(batches[:6])) == 3 and batches[:6] != batches[6:12]  # rounds are shuffled, each differently


def test_the_order_is_a_pure_function_of_the_position_so_a_resume_continues_it():
    labels = [(512, 512)] * 4 + [(576, 448)] * 3 + [(448, 576)] * 2
    straight = DataOrder(len(labels), 5, seed=7, buckets=labels)
    drawn = [straight.next_batch(3) for _ in range(20)]
    for stop in (1, 6, 13):
        first = DataOrder(len(labels), 5, seed=7, buckets=labels)
        for _ in range(stop):
            first.next_batch(3)
        resumed = DataOrder(len(labels), 5, seed=7, **first.state(), buckets=labels)
        assert [resumed.next_batch(3) for _ in range(20 - stop)] == drawn[stop:]
    other_seed = DataOrder(len(labels), 5, seed=8, buckets=labels)
    assert [other_seed.next_batch(3) for _ in range(20)] != drawn


def test_one_bucket_is_the_order_without_buckets():
    plain = DataOrder(6, 3, seed=1)
    bucketed = DataOrder(6, 3, seed=1, buckets=[(512, 512)] * 6)
    assert [plain.next_batch(4) for _ in range(10)] == [bucketed.next_batch(4) for _ in range(10)]


# --- the crop, SDXL's time ids and the latent cache ----------------------------------------------------------


def _stripes(width: int, height: int) -> Image.Image:
    """Every column a different colour, so that a crop's place shows in its pixels."""
    x = np.arange(width)
    pixels = np.stack([x * 7 % 256, x * 13 % 256, np.full(width, 90)], axis=1).astype(np.uint8)
    return Image.fromarray(np.broadcast_to(pixels[None], (height, width, 3)).copy(), "RGB")


def test_crop_to_covers_the_bucket_and_cuts_its_middle_or_where_the_rng_says():
    image = _stripes(330, 100)
    crop, corner = crop_to(image, (64, 192), True, random.Random(0))
    assert crop.size == (192, 64) and corner == (0, 9)  # scaled to 211x64: 19 columns to spare, 9 on the left
    corners = {crop_to(image, (64, 192), False, random.Random(seed))[1] for seed in range(12)}
    assert len(corners) > 3 and all(top == 0 and 0 <= left <= 19 for top, left in corners)
    tall, corner = crop_to(image, (192, 64), True, random.Random(0))
    assert tall.size == (64, 192) and corner == (0, 285)  # a wide photo in a tall bucket: scaled to 634x192


@pytest.mark.parametrize("center_crop", [True, False])
def test_sdxl_time_ids_are_the_crop_actually_applied_to_a_wide_photo(tiny_sdxl, tmp_path, monkeypatch, center_crop):
    """A 330x100 photo in the 192x64 bucket: original size (100, 330), scaled to 211x64, crop corner (0, left); the
    pixels the VAE encodes are exactly that crop of the scaled photo (mirrored: at the mirrored place)."""
    photo = tmp_path / "wide.png"
    _stripes(330, 100).save(photo)
    scaled = np.asarray(_stripes(330, 100).resize((211, 64), Image.LANCZOS), dtype=np.float32) / 127.5 - 1
    encoded: list[torch.Tensor] = []
    encode = ImageLatents._encode
    monkeypatch.setattr(ImageLatents, "_encode", lambda self, pixels: (encoded.append(pixels), encode(self, pixels))[1])
    latents = ImageLatents(tiny_sdxl.components.vae, 128, center_crop, False, None, "m", torch.device("cpu"), 32)
    lefts = set()
    for seed in range(4):
        for flip in (False, True):
            encoded.clear()
            sample, (geometry,) = latents.sample([photo], [flip], (64, 192), random.Random(seed),
                                                 torch.Generator().manual_seed(0))
            assert sample.shape == (1, 4, 8, 24)
            top, left = geometry.crop_top_left
            assert (geometry.original_size, top, geometry.target_size) == ((100, 330), 0, (64, 192))
            lefts.add(left)
            source = scaled[:, ::-1] if flip else scaled
            (pixels,) = encoded
            assert np.allclose(pixels[0].numpy(), source[:64, left:left + 192].transpose(2, 0, 1), atol=1e-6)
            time_ids = family_named("sdxl").time_ids([geometry], torch.device("cpu"))
            assert time_ids.tolist() == [[100, 330, 0, left, 64, 192]]
    if center_crop:  # the centre: 9 of the 19 spare columns on the left (10 on the mirrored photo)
        assert lefts == {9, 10}
    else:
        assert len(lefts) > 2


def test_the_latent_cache_keeps_one_entry_per_bucket(tiny, tmp_path):
    photo = tmp_path / "wide.png"
    _stripes(330, 100).save(photo)
    cache_dir = tmp_path / "cache"
    sizes = [(128, 128), (64, 192), (192, 64)]

    def prepared() -> ImageLatents:
        latents = ImageLatents(tiny.components.vae, 128, True, True, cache_dir, "m", torch.device("cpu"), 32)
        latents.prepare([(photo, size) for size in sizes], (False,), lambda *_: None)
        return latents

    first = prepared()
    names = sorted(p.name.split("_")[1] for p in cache_dir.glob("*.safetensors"))
    assert names == ["128", "192x64", "64x192"]  # the square keeps the name it had before buckets (width x height)
    again = prepared()
    assert again.encodes == 0 and first.encodes == 3
    for size in sizes:
        a = first.sample([photo], [False], size, random.Random(0), torch.Generator().manual_seed(0))
        b = again.sample([photo], [False], size, random.Random(0), torch.Generator().manual_seed(0))
        assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[1][0].target_size == size
        assert a[0].shape[2:] == (size[0] // 8, size[1] // 8)


# --- training ------------------------------------------------------------------------------------------------


def _mixed_photos(folder: Path) -> Path:
    """Two wide photos (the 192x64 bucket at 128 px), two squares and one tall photo (64x192)."""
    rng = np.random.default_rng(0)
    for name, (width, height) in {"wide_a": (330, 100), "wide_b": (300, 96), "sq_a": (128, 128),
                                  "sq_b": (140, 136), "tall": (100, 320)}.items():
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{name}.png")
    return folder


def _square_photos(folder: Path) -> Path:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (150, 150, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture
def batches_seen(monkeypatch) -> list[tuple[tuple[int, ...], list[ImageGeometry], list]]:
    """Each batch's latent shape, the geometries of its images and the time ids the UNet is given."""
    seen: list = []
    sample, call = ImageLatents.sample, cache_module.PromptEmbeddings.__call__

    def sampling(self, paths, flips, size, rng, generator):
        latents, geometries = sample(self, paths, flips, size, rng, generator)
        seen.append([tuple(latents.shape), geometries, None])
        return latents, geometries

    def conditioning(self, prompts, trainable, geometries=None):
        result = call(self, prompts, trainable, geometries)
        if geometries is not None and seen:
            seen[-1][2] = None if result.time_ids is None else result.time_ids.tolist()
        return result

    monkeypatch.setattr(ImageLatents, "sample", sampling)
    monkeypatch.setattr(cache_module.PromptEmbeddings, "__call__", conditioning)
    return seen


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_photos_of_mixed_shapes_train_in_their_buckets_with_class_images_cropped_to_match(
    make_config, tiny_sdxl, tmp_path, batches_seen, monkeypatch, family
):
    """Batch 2 with prior preservation (square class images generated at 128 px): every batch is one bucket's shape,
    its class images are cropped to it, SDXL's time ids are each image's own crop; each bucket appears. CUDA graphs
    (asked for by a stand-in here: they run on CUDA only) are turned off with a warning saying why."""
    monkeypatch.setattr(loop, "_graph_kind", lambda *_: "denoiser")
    models = {"sdxl": {"source_checkpoint": str(tiny_sdxl.path), "model_config_dir": str(tiny_sdxl.config_dir)},
              "sd1": {}}[family]
    photos = _mixed_photos(tmp_path / "photos")
    config = make_config(concept={"instance_dir": str(photos), "num_class_images": 2}, resolution=128, batch_size=2,
                         max_steps=3, hflip=True, **models)  # a round: one batch of each bucket, shuffled
    seen: list[dict] = []
    result = run(config, tmp_path / "zwx", Events(on_event=seen.append))
    assert result.step == 3 and all(math.isfinite(x) for x in result.losses) and result.checkpoints
    statuses = [e["message"] for e in seen if e["event"] == "status"]
    assert "Aspect-ratio buckets (width x height): 192x64: 2 images, 128x128: 2 images, 64x192: 1 image" in statuses
    shapes = [shape for shape, _, _ in batches_seen]
    assert {s[2:] for s in shapes} == {(16, 16), (8, 24), (24, 8)}
    for shape, geometries, time_ids in batches_seen:
        assert shape[0] == 4  # two instance images, two class images
        bucket = (shape[2] * 8, shape[3] * 8)
        assert all(g.target_size == bucket for g in geometries)  # the class images follow the bucket
        assert all(g.original_size == (128, 128) for g in geometries[2:])  # generated class images: square
        if family == "sdxl":
            assert time_ids == [g.as_time_ids() for g in geometries]
        else:
            assert time_ids is None
    started = next(e for e in seen if e["event"] == "started")
    assert started["cuda_graphs"] is None
    assert any("fall in 3 aspect-ratio buckets" in e["message"] for e in seen if e["event"] == "warning")


def test_square_photos_train_exactly_as_without_buckets(make_config, tmp_path):
    photos = _square_photos(tmp_path / "photos")
    losses = {}
    for on in (True, False):
        config = make_config(concept={"instance_dir": str(photos), "num_class_images": 1}, resolution=128,
                             batch_size=2, max_steps=2, hflip=True, center_crop=False, aspect_buckets=on)
        losses[on] = run(config, tmp_path / str(on) / "zwx", Events()).losses
    assert losses[True] == losses[False]


def test_buckets_change_what_photos_of_other_shapes_train_on(make_config, tmp_path):
    photos = _mixed_photos(tmp_path / "photos")
    losses = {}
    for on in (True, False):
        config = make_config(concept={"instance_dir": str(photos)}, resolution=128, max_steps=2, aspect_buckets=on,
                             prior_preservation=False)
        losses[on] = run(config, tmp_path / str(on) / "zwx", Events()).losses
    assert losses[True] != losses[False]


def test_a_bucketed_run_resumes_bit_for_bit(make_config, tmp_path, batches_seen):
    photos = _mixed_photos(tmp_path / "photos")
    config = make_config(concept={"instance_dir": str(photos), "num_class_images": 1}, resolution=128,
                         max_steps=4, hflip=True, center_crop=False)
    straight = run(config, tmp_path / "a" / "zwx", Events())
    assert len({shape for shape, _, _ in batches_seen}) > 1  # the resume point falls between batches of two buckets
    interrupted = tmp_path / "b" / "zwx"

    def cancel_at_2(event: dict) -> None:
        if event["event"] == "step" and event["step"] == 2:
            (interrupted / CANCEL_FILE).touch()

    assert run(config, interrupted, Events(on_event=cancel_at_2)).step == 2
    resumed = run(config, interrupted, Events())
    assert resumed.losses == straight.losses[2:]
    a, b = read_tensors(straight.checkpoints[-1]), read_tensors(resumed.checkpoints[-1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # turned off, the buckets no longer draw the batches: that resume point does not continue it (a fresh start)
    squares = tmp_path / "c" / "zwx"
    assert run(config, squares, Events(on_event=lambda e: e["event"] == "step" and e["step"] == 2
                                       and (squares / CANCEL_FILE).touch())).step == 2
    unbucketed = config.__class__.from_dict({**config.to_dict(), "aspect_buckets": False})
    assert len(run(unbucketed, squares, Events()).losses) == 4


def test_compile_unet_runs_every_buckets_shape_before_the_first_step(make_config, tmp_path, monkeypatch):
    """Blocks compile with static shapes, so each bucket's shape is a compile of its own: all of them run before
    step 1 (where the compile's time is reported and a cancel reaches it), not minutes into training, and dynamo's
    recompile limit allows them all. The compiler is a stand-in here (a real CPU compile of three shapes takes
    minutes: test_compile_unet.py compiles for real)."""
    photos = _mixed_photos(tmp_path / "photos")
    announced: list[int] = []
    shapes: list[tuple[int, ...]] = []
    started: list[int] = []

    def stand_in(unet, shapes=1):
        announced.append(shapes)
        unet.register_forward_pre_hook(lambda _, args: shapes_seen(args[0]))
        return 7

    def shapes_seen(sample):
        if not started:
            shapes.append(tuple(sample.shape[2:]))

    monkeypatch.setattr(loop, "compile_blocks", stand_in)
    config = make_config(concept={"instance_dir": str(photos)}, resolution=128, max_steps=1, compile_unet=True,
                         prior_preservation=False)
    run(config, tmp_path / "zwx", Events(on_event=lambda e: e["event"] == "started" and started.append(1)))
    assert sorted(shapes) == [(8, 24), (16, 16), (24, 8)]
    assert announced == [3]


def test_the_recompile_limit_allows_every_block_at_every_shape(tiny):
    config = torch._dynamo.config  # a process-wide setting: put back as it was (monkeypatch would delete it)
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    before = getattr(config, name)
    setattr(config, name, 8)
    try:
        count = compile_blocks(copy.deepcopy(tiny.components.unet), shapes=3)  # wrapped only: compiles when called
        assert count > 2 and getattr(config, name) == 3 * count
    finally:
        setattr(config, name, before)
