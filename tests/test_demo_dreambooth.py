"""DreamBooth on the demo model, reduced to the CI size (``run_demo(quick=True)``: the default settings with 16
class images, 16 samples per prompt and 10 DDIM steps; about 2 minutes 20 seconds on 2 CPU threads): two engine
runs on the CPU, with and without prior preservation, samples judged by pixel statistics.

Measured over seeds 0, 1, 2 with the default training (UNet and text encoder at 1e-4, 800 steps; subject = the
two-tone magenta/cyan star; stars = star-shaped class-prompt samples):

    seed | prior: fidelity, recontext, leakage, stars | no prior: fidelity, recontext, leakage, stars
      0  |        94%, 88%, 0%, 0/16                  |           81%, 81%,  81%, 14/16
      1  |        94%, 31%, 0%, 0/16                  |           94%, 69%,  94%, 16/16
      2  |        94%, 88%, 0%, 1/16                  |          100%, 12%, 100%, 16/16

The base model scored 0% fidelity and 0% leakage on every seed. The test runs seed 0, but another CPU may round
differently and take another path through the same training, so the bounds are set from the spread over seeds and
devices, not from seed 0 here: fidelity >= 10/16 (the H100's 8 seeds of the full-size run bottomed out at 62%;
bench/results/2026-11-25-h100-demo-sweep3), leakage <= 2/16 (its worst: 12%), and the no-prior run leaking at least
8/16 more (75-100% here, full size and quick). Recontextualisation is not asserted: it spans 0-97% over seeds and
devices (31-88% above), so a bound on it would test the path, not the training. The full-size numbers are in the
README.
"""

from __future__ import annotations

import pytest

from dreambooth.demo.run import run_demo

pytestmark = pytest.mark.slow  # the reduced demo: three trainings of 800 steps and 13 sample batches


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return run_demo(tmp_path_factory.mktemp("demo"), quick=True, seed=0)


def _stars(report, model: str) -> float:
    shapes = report.row(model).class_shapes
    return shapes.get("star", 0) / sum(shapes.values())


def test_base_model_has_never_drawn_the_subject(report):
    base = report.row("base")
    assert base.fidelity == 0 and base.leakage == 0 and base.recontext == 0


def test_training_with_prior_preservation_teaches_the_subject_and_keeps_the_class(report):
    prior = report.row("prior")
    assert prior.fidelity >= 10 / 16  # measured 15/16 on every seed
    assert prior.leakage <= 2 / 16  # measured 0 on every seed


def test_without_prior_preservation_the_subject_leaks_into_the_class(report):
    prior, no_prior = report.row("prior"), report.row("no prior")
    assert no_prior.leakage >= prior.leakage + 8 / 16  # measured at least 13/16 more
    assert _stars(report, "no prior") > _stars(report, "prior")


def test_a_lora_with_prior_preservation_teaches_the_subject_and_keeps_the_class(report):
    lora = report.row("lora prior")
    assert lora.fidelity >= 10 / 16  # the full fine-tune's bounds
    assert lora.leakage <= 2 / 16
    assert report.row("no prior").leakage >= lora.leakage + 8 / 16


def test_demo_writes_checkpoints_a_lora_a_grid_and_loss_curves(report):
    from dreambooth.models.lora_file import read_lora

    assert report.grid.is_file()
    assert set(report.checkpoints) == {"prior", "no prior", "lora prior"}
    assert all(path.is_file() for path in report.checkpoints.values())
    layers, _header = read_lora(report.checkpoints["lora prior"])
    assert {layer.rank for layer in layers.values()} == {report.settings.lora_rank}
    assert any(stem.startswith("lora_te_") for stem in layers)  # the text encoder trains, as in the full runs
    assert all(len(report.losses[name]) == report.settings.steps for name in ("prior", "no prior"))
    assert len(report.losses["lora prior"]) == report.settings.lora_steps
