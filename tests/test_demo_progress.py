"""The demo's progress (``demo/progress.py``): a bar per phase with an ETA on a terminal, JSON lines when piped."""

from __future__ import annotations

import io
import json
from pathlib import Path

from dreambooth.demo.progress import DemoProgress
from dreambooth.demo.run import run_demo

EVENTS = [
    {"event": "phase", "demo_phase": "Training with prior preservation"},
    {"event": "progress", "phase": "Generating class images", "done": 4, "total": 32, "demo_phase": "x"},
    {"event": "step", "step": 400, "total": 800, "loss": 0.1234, "eta_s": 95.0, "it_per_s": 4.2, "demo_phase": "x"},
    {"event": "warning", "message": "careful", "demo_phase": "x"},
    {"event": "phase", "demo_phase": "Sampling and judging"},
    {"event": "demo_finished", "seconds": 451.2, "demo_phase": "Sampling and judging"},
]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_per_phase_with_an_eta_and_the_seconds():
    out = _Terminal()
    progress = DemoProgress(out)
    for event in EVENTS:
        progress(event)
    text = out.getvalue()
    assert not progress.json_lines
    assert "== Training with prior preservation\n" in text and "== Sampling and judging\n" in text
    assert "] 4/32 ETA " in text and "Generating class images" in text
    assert "] 400/800 ETA 1:35 loss 0.1234" in text
    assert "\nwarning: careful\n" in text and text.endswith("done in 451 s (7:31)\n")


def test_piped_output_is_one_json_event_a_line_and_json_can_be_asked_for_on_a_terminal():
    for stream, flag in ((io.StringIO(), None), (_Terminal(), True)):
        progress = DemoProgress(stream, json_lines=flag)
        for event in EVENTS:
            progress(event)
        assert [json.loads(line) for line in stream.getvalue().splitlines()] == EVENTS


def test_the_demo_output_folder_is_ignored_by_git():
    ignored = (Path(__file__).resolve().parent.parent / ".gitignore").read_text().splitlines()
    assert "/demo-output/" in ignored


def test_a_miniature_demo_reports_each_phase_while_it_runs(tmp_path, tokenizer_dir):
    """The whole demo at a toy size (4 steps per training, 2 class images, 2 samples per prompt): the events it
    reports."""
    seen: list[dict] = []
    tiny = {"steps": 4, "lora_steps": 4, "num_class_images": 2, "class_steps": 2, "samples": 2, "sample_steps": 2}
    report = run_demo(tmp_path, seed=0, overrides=tiny, tokenizer_dir=str(tokenizer_dir), progress=seen.append)
    phases = [e["demo_phase"] for e in seen if e["event"] == "phase"]
    assert phases == ["Training with prior preservation (class images first)",
                      "Training without prior preservation",
                      "Training a LoRA with prior preservation (same class images)", "Sampling and judging"]
    class_images = [e for e in seen if e["event"] == "progress" and e["phase"] == "Generating class images"]
    assert class_images and class_images[-1]["done"] == class_images[-1]["total"] == 2
    assert all(e["demo_phase"] == phases[0] for e in class_images)
    last_steps = {e["demo_phase"]: e for e in seen if e["event"] == "step"}
    assert sorted(last_steps) == sorted(phases[:3])
    assert all(e["step"] == e["total"] == 4 and "eta_s" in e for e in last_steps.values())
    assert not [e for e in seen if e["event"] == "progress" and e["phase"] == "Generating class images"
                and e["demo_phase"] == phases[2]]  # the LoRA run reuses the first run's class images
    assert [e["done"] for e in seen if e.get("phase") == "sample batches"] == list(range(1, 14))
    assert seen[-1]["event"] == "demo_finished" and seen[-1]["seconds"] == round(report.seconds, 1)
