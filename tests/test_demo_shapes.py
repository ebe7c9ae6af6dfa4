"""The demo's picture generator and its pixel-statistics judge agree, on sharp and on blurred pictures."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dreambooth.demo import shapes
from dreambooth.demo.evaluate import judge, judge_batch


def _scenes(count: int, seed: int) -> shapes.Scenes:
    return shapes.sample_scenes(count, torch.Generator().manual_seed(seed), shapes=shapes.SHAPES,
                                radius_range=(0.38, 0.62))


def test_same_seed_same_pictures_and_captions():
    a = shapes.render(_scenes(6, 3))
    b = shapes.render(_scenes(6, 3))
    assert torch.equal(a, b)
    c1 = shapes.captions(_scenes(6, 3), torch.Generator().manual_seed(1))
    c2 = shapes.captions(_scenes(6, 3), torch.Generator().manual_seed(1))
    assert c1 == c2 and all(c.startswith("a ") for c in c1)


def test_pictures_have_the_described_colours():
    scenes = _scenes(8, 0)
    images = shapes.to_uint8(shapes.render(scenes)).numpy()
    for image, background in zip(images, scenes.background):
        assert tuple(image[0, 0]) == tuple(int(255 * v) for v in shapes.COLOURS[background])


def test_judge_reads_every_rendered_scene():
    scenes = _scenes(120, 1)
    verdicts = judge_batch(shapes.to_uint8(shapes.render(scenes)).numpy())
    assert [v.shape for v in verdicts] == scenes.shape
    assert [v.colour for v in verdicts] == scenes.colour
    assert [v.background for v in verdicts] == scenes.background


def test_judge_survives_blur_and_noise_like_an_autoencoder_adds():
    generator = torch.Generator().manual_seed(2)
    scenes = _scenes(120, 2)
    images = shapes.render(scenes)
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, 1)
    noisy = (blurred + 0.05 * torch.randn(blurred.shape, generator=generator)).clamp(0, 1)
    verdicts = judge_batch(shapes.to_uint8(noisy).numpy())
    shape_ok = np.mean([v.shape == s for v, s in zip(verdicts, scenes.shape)])
    colour_ok = np.mean([v.colour == c for v, c in zip(verdicts, scenes.colour)])
    assert shape_ok >= 0.97 and colour_ok == 1.0


def test_subject_is_recognised_and_nothing_else_is():
    generator = torch.Generator().manual_seed(4)
    subject = judge_batch(shapes.to_uint8(shapes.render(shapes.sample_subject_scenes(10, generator))).numpy())
    assert all(v.is_subject for v in subject)
    others = judge_batch(shapes.to_uint8(shapes.render(_scenes(60, 5))).numpy())
    assert not any(v.is_subject for v in others)
    one_colour_star = shapes.Scenes(["star"], ["magenta"], ["magenta"], ["white"], torch.zeros(1, 2),
                                    torch.tensor([0.6]), torch.zeros(1))
    verdict = judge(shapes.to_uint8(shapes.render(one_colour_star)).numpy()[0])
    assert verdict.shape == "star" and not verdict.is_subject


def test_plain_background_has_no_shape():
    flat = np.full((64, 64, 3), 255, dtype=np.uint8)
    assert judge(flat).shape == "none"


def test_autoencoder_pictures_are_generic():
    generator = torch.Generator().manual_seed(0)
    outlines = shapes.polygon_outlines(16, generator)
    images = shapes.random_polygons(8, generator, outlines)
    assert images.shape == (8, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
