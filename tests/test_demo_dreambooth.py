"""DreamBooth on the demo model, reduced to the CI size (``run_demo(quick=True)``): two engine runs on the CPU
(with and without prior preservation), samples judged by pixel statistics.

What the reduced run reliably shows today, measured over seeds 0, 1, 2 (16 samples per prompt; star counts
among the class-prompt ("a shape") samples; subject = two-tone magenta/cyan star):

    seed | base: stars, subject | prior: stars, subject, leakage | no prior: stars, subject, leakage
      0  |   0/16, 0%           |   8/16, 0%, 0%                 |  10/16,  0%, 0%
      1  |   0/16, 0%           |   6/16, 0%, 0%                 |  13/16,  0%, 0%
      2  |   0/16, 0%           |  10/16, 0%, 0%                 |  11/16, 19%, 6%

So: the base model has never drawn a star; training on the five star pictures moves the class prompt towards
stars, and less so with prior preservation than without (3 of 3 seeds). The strict subject score (both colours
right) is not reached yet: the issue's fidelity targets are NOT met, and these tests do not pretend they are.
"""

from __future__ import annotations

import pytest

from dreambooth.demo.run import run_demo


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return run_demo(tmp_path_factory.mktemp("demo"), quick=True, seed=0)


def _stars(report, model: str) -> float:
    shapes = report.row(model).class_shapes
    return shapes.get("star", 0) / sum(shapes.values())


def test_base_model_has_never_drawn_the_subject(report):
    base = report.row("base")
    assert base.fidelity == 0 and base.leakage == 0
    assert _stars(report, "base") <= 1 / 16


def test_training_on_the_instance_images_teaches_stars(report):
    assert _stars(report, "no prior") >= 0.5


def test_prior_preservation_holds_the_class_back(report):
    assert _stars(report, "prior") <= _stars(report, "no prior")
    assert report.row("prior").leakage <= 0.1


def test_demo_writes_checkpoints_and_a_grid(report):
    assert report.grid.is_file()
    assert set(report.checkpoints) == {"prior", "no prior"}
    assert all(path.is_file() for path in report.checkpoints.values())
