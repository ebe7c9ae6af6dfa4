"""``compile_unet``: the UNet compiled block by block trains as the plain one does, and a compiler that fails
leaves a UNet that trains exactly as usual, with a warning that says why.

The compile here is real (torch.compile's CPU backend, a C++ compiler); its speed is measured on the GPU in bench/.
"""

from __future__ import annotations

import torch

from dreambooth.engine import run
from dreambooth.events import Events


def _train(make_config, model_dir, **options) -> tuple[dict, list[float], list[str]]:
    seen: list[dict] = []
    run(make_config(**options), model_dir, Events(on_event=seen.append))
    started = next(e for e in seen if e["event"] == "started")
    losses = [e["loss"] for e in seen if e["event"] == "step"]
    return started, losses, [e["message"] for e in seen if e["event"] == "warning"]


def test_the_compiled_unet_trains_as_the_plain_one(make_config, tmp_path):
    plain, plain_losses, _ = _train(make_config, tmp_path / "plain")
    compiled, compiled_losses, warnings = _train(make_config, tmp_path / "compiled", compile_unet=True)
    assert plain["compiled_blocks"] == 0
    assert compiled["compiled_blocks"] > 0, warnings
    assert compiled["compile_s"] > 0
    assert len(compiled_losses) == len(plain_losses) == 3
    assert torch.allclose(torch.tensor(compiled_losses), torch.tensor(plain_losses), rtol=1e-3, atol=1e-5)


def test_a_unet_that_cannot_compile_trains_as_usual(make_config, tmp_path, monkeypatch):
    def broken_compile(self, *args, **kwargs):
        def fails(*a, **k):
            raise RuntimeError("Compiler: cl is not found.\nmore detail")

        self._compiled_call_impl = fails

    plain, plain_losses, _ = _train(make_config, tmp_path / "plain")
    monkeypatch.setattr(torch.nn.Module, "compile", broken_compile)
    started, losses, warnings = _train(make_config, tmp_path / "broken", compile_unet=True)
    assert started["compiled_blocks"] == 0
    assert any("could not be compiled (RuntimeError: Compiler: cl is not found.)" in w for w in warnings), warnings
    assert losses == plain_losses


def test_a_torch_without_module_compile_trains_as_usual(make_config, tmp_path, monkeypatch):
    """torch 2.1 (the web UI's pin) has torch.compile but not ``nn.Module.compile``."""
    plain, plain_losses, _ = _train(make_config, tmp_path / "plain")
    monkeypatch.delattr(torch.nn.Module, "compile")
    started, losses, warnings = _train(make_config, tmp_path / "old", compile_unet=True)
    assert started["compiled_blocks"] == 0
    assert any("could not be compiled (AttributeError" in w for w in warnings), warnings
    assert losses == plain_losses
