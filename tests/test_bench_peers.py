"""``bench/peers.py``, the side-by-side GPU benchmark against kohya's and diffusers' trainers: its rows resolve, kohya
finds its tokenizers offline, the clock ends a process after its timed window, losses are read from both peers'
progress bars, and ratios pair each of ours with the peer's row."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import peers  # noqa: E402

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_every_default_row_and_pair_names_a_mode_of_its_runner() -> None:
    known = {"engine": peers.ENGINE_MODES, "kohya": peers.KOHYA_MODES, "diffusers": peers.DIFFUSERS_MODES}
    names = [*peers.RUNS, *(p for _, peer, ours in peers.PAIRS for p in (peer, *ours))]
    unknown = [n for n in names if peers.kind_of(n)[1] not in known[peers.kind_of(n)[0]]]
    assert not unknown
    assert "engine:sdxl-lowmem-adafactor" in peers.RUNS


def test_a_mode_of_family_memory_is_a_row_of_both_families() -> None:
    modes = peers.engine_modes({"new": {"optimizer": "adafactor"}}, {"lora-x": {"lora_rank": 4}})
    assert modes["sdxl-new"][1]["optimizer"] == "adafactor" and modes["sd2-new"][0] == "sd2"
    assert modes["sdxl-lora-x"][1]["method"] == "lora" and "sd2-lora-x" not in modes
    assert modes["sd2-new"][1]["prior_preservation"] and modes["sd2-new"][1]["batch_size"] == 1


def test_kohya_reads_both_tokenizers_from_its_cache_folder(tokenizer_dir: Path, tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    root = peers.kohya_tokenizers(tokenizer_dir, tmp_path / "tok")
    first = CLIPTokenizer.from_pretrained(str(root / "openai_clip-vit-large-patch14"))
    second = CLIPTokenizer.from_pretrained(str(root / "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"))
    for tokenizer in (first, second):
        ids = tokenizer("a photo of zwx dog", padding="max_length", truncation=True, max_length=None).input_ids
        assert tokenizer.model_max_length == 77 and len(ids) == 77
    assert second.pad_token == "!" and second.pad_token_id == 0
    assert first.pad_token_id == first.eos_token_id


def test_the_clock_ends_the_process_after_its_timed_window(tmp_path: Path) -> None:
    timing = tmp_path / "timing.json"
    script = (f"import sys; sys.path.insert(0, {str(BENCH)!r})\n"
              "from timing import StepClock\n"
              f"clock = StepClock({str(timing)!r}, 1, 2, exit_when_timed=True, runner='x')\n"
              "for _ in range(10):\n    clock.at_step()\n"
              "print('still running')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    marks = json.loads(timing.read_text())
    assert done.returncode == 0 and "still running" not in done.stdout
    assert marks["steps_seen"] == 4 and marks["exited_after_timed"] and marks["runner"] == "x"
    assert marks["timed_end"] >= marks["timed_start"]


def test_losses_are_read_from_both_peers_progress_bars(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_text("steps:  40%|####| 10/25 [00:05<00:07, avr_loss=0.0842]\r"
                   "Steps: 10%| 3/30 [00:01<00:09, loss=0.0931, lr=5e-06]\nsteps: avr_loss=nan\n")
    assert peers.peer_losses(log)[:2] == [0.0842, 0.0931]
    row = peers.summarize("kohya:sdxl-ft", {}, 0.0, 0, 1.0, 20, log)
    assert row["losses_logged"] == 3 and not row["losses_finite"]


def test_ratios_pair_each_of_ours_with_the_peer() -> None:
    rows = [
        {"run": "kohya:sdxl-ft", "rc": 0, "steps_per_s": 1.5, "peak_gb": 12.0, "steps_peak_gb": 10.0},
        {"run": "engine:sdxl-lowmem", "rc": 0, "steps_per_s": 3.0, "peak_gb": 13.0, "steps_peak_gb": 8.0},
        {"run": "engine:sdxl-lowmem-adafactor", "rc": "config", "error": "ConfigError: Adafactor | fp32"},
        {"run": "diffusers:sd2-bf16", "skipped": "budget: 30 s left"},
    ]
    md = peers.table(rows, {"gpu": "test"})
    assert "engine:sdxl-lowmem / kohya:sdxl-ft = **2.00×** steps/s" in md
    assert "(steps, 0.80×)" in md and "(process, 1.08×)" in md
    assert "ConfigError: Adafactor / fp32" in md and "budget: 30 s left" in md
