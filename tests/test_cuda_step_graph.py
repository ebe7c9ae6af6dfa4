"""On a GPU: the whole training step recorded as one CUDA graph (forward, loss, backward with the fused optimizer
step inside, gradient checkpointing included) learns as the same step run eagerly does.

Needs CUDA, so CI (CPU only) skips it and counts nothing from it; it runs on the device machine:
``python -m pytest -q tests/test_cuda_step_graph.py``. Speed is measured by ``bench/``, not here.
"""

import pytest
import torch

from dreambooth.engine import run
from dreambooth.events import Events
from dreambooth.models.read import read_tensors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="records CUDA graphs: needs a GPU")


def _train(make_config, folder, **options):
    collected: list[dict] = []
    config = make_config(
        device="cuda", max_steps=40, weights_dtype="bf16", optimizer_in_backward=True, learning_rate=3e-4,
        log_every=1, save_dtype="fp32", **options,
    )
    result = run(config, folder, Events(on_event=collected.append))
    started = next(e for e in collected if e["event"] == "started")
    started["warnings"] = [e["message"] for e in collected if e["event"] == "warning"]
    return result, started, read_tensors(result.checkpoints[-1])


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "adamw"])
@pytest.mark.parametrize("checkpointing", [True, False])
def test_the_recorded_step_learns_like_the_eager_step(make_config, tmp_path, tiny, optimizer, checkpointing):
    options = {"optimizer": optimizer, "gradient_checkpointing": checkpointing}
    graphed, graphed_start, graphed_weights = _train(make_config, tmp_path / "g" / "zwx", cuda_graphs=True, **options)
    eager, eager_start, eager_weights = _train(make_config, tmp_path / "e" / "zwx", cuda_graphs=False, **options)
    assert graphed_start["cuda_graphs"] == "step", graphed_start["warnings"]
    assert not eager_start["cuda_graphs"]
    assert graphed_start["optimizer"] == eager_start["optimizer"]
    # same seed, same data, same noise: the first step's loss is the same number
    assert graphed.losses[0] == pytest.approx(eager.losses[0], rel=1e-2)
    late = slice(len(eager.losses) // 2, None)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    assert mean(graphed.losses[late]) == pytest.approx(mean(eager.losses[late]), rel=0.15)
    source = read_tensors(tiny.path)
    unet = [k for k in eager_weights if k.startswith("model.diffusion_model.")]
    moved = sum((eager_weights[k].float() - source[k].float()).norm() ** 2 for k in unet) ** 0.5
    apart = sum((graphed_weights[k].float() - eager_weights[k].float()).norm() ** 2 for k in unet) ** 0.5
    assert moved > 0 and apart < 0.5 * moved  # both learned, and learned nearly the same thing


def test_a_run_stopped_and_resumed_continues_where_the_recorded_step_left_off(make_config, tmp_path):
    """Cancel at step 3 of 6, resume: the resumed run records the step again and ends where an uninterrupted run
    ends (bit for bit when two uninterrupted runs agree bit for bit; else no further apart than they are)."""
    from dreambooth.events import CANCEL_FILE

    def train(folder, on_event=None):
        collected: list[dict] = []

        def listen(event):
            collected.append(event)
            if on_event:
                on_event(event)

        config = make_config(device="cuda", max_steps=6, weights_dtype="bf16", optimizer_in_backward=True,
                             optimizer="adamw_8bit", gradient_checkpointing=True, learning_rate=3e-4, log_every=1,
                             save_dtype="fp32")
        result = run(config, folder, Events(on_event=listen))
        started = next(e for e in collected if e["event"] == "started")
        return result, started

    first, started = train(tmp_path / "a" / "zwx")
    second, _ = train(tmp_path / "b" / "zwx")
    assert started["cuda_graphs"] == "step"
    stopped_dir = tmp_path / "c" / "zwx"

    def stop_at_3(event):
        if event["event"] == "step" and event["step"] == 3:
            (stopped_dir / CANCEL_FILE).touch()

    stopped, _ = train(stopped_dir, stop_at_3)
    assert stopped.step == 3 and stopped.cancelled
    resumed, resumed_start = train(stopped_dir)
    assert resumed_start["resumed_from"] == 3 and resumed_start["cuda_graphs"] == "step"
    assert resumed.losses == pytest.approx(first.losses[3:], rel=1e-2)

    def gap(a, b) -> float:
        x, y = read_tensors(a.checkpoints[-1]), read_tensors(b.checkpoints[-1])
        return sum((x[k].float() - y[k].float()).norm() ** 2 for k in x) ** 0.5

    chance = gap(first, second)
    if chance == 0:
        assert gap(first, resumed) == 0
    else:
        assert gap(first, resumed) <= 2 * chance
