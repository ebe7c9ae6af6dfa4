"""Our safetensors writer (``models.export.write_safetensors``, behind every checkpoint we save): what safetensors
reads back is what was written, for every dtype a checkpoint holds, with the metadata; and it never holds a second
copy of the model in memory as ``safetensors.torch.save_file`` does (6.5 GB more for an SDXL in fp16)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreambooth.models.export import save_checkpoint, write_safetensors

REPO = Path(__file__).resolve().parent.parent


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "model.diffusion_model.out.2.weight": torch.randn(4, 3, 3, 3, generator=generator).half(),
        "first_stage_model.decoder.conv_in.bias": torch.randn(7, generator=generator),
        "conditioner.embedders.1.model.logit_scale": torch.tensor(4.6052),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77).unsqueeze(0),
        "bf16": torch.randn(5, 2, generator=generator).bfloat16(),
        "transposed": torch.randn(3, 5, generator=generator).t(),  # not contiguous
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(10, dtype=torch.uint8),
        "empty": torch.zeros(0, 4),
        "alphas_cumprod": torch.linspace(0.99, 0.01, 9, dtype=torch.float64),
    }


def test_what_safetensors_reads_is_what_was_written(tmp_path: Path) -> None:
    tensors = _tensors()
    metadata = {"modelspec.title": "zwx (step 2) — ünïcode", "dreambooth.training": '{"step": 2}'}
    ours = save_checkpoint(tmp_path / "ours.safetensors", tensors, metadata)
    back = load_file(str(ours))
    assert sorted(back) == sorted(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape, name
        assert torch.equal(back[name], tensor), name
    with safe_open(str(ours), framework="pt") as handle:
        assert handle.metadata() == metadata
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "theirs.safetensors"), metadata)
    assert ours.stat().st_size == (tmp_path / "theirs.safetensors").stat().st_size
    assert not list(tmp_path.glob("*.partial"))


def test_no_metadata_and_bad_input(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "plain.safetensors", {"w": torch.ones(2)})
    with safe_open(str(tmp_path / "plain.safetensors"), framework="pt") as handle:
        assert handle.metadata() is None and torch.equal(handle.get_tensor("w"), torch.ones(2))
    with pytest.raises(TypeError, match="metadata"):
        write_safetensors(tmp_path / "bad.safetensors", {"w": torch.ones(2)}, {"step": 2})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="complex"):
        write_safetensors(tmp_path / "bad.safetensors", {"w": torch.ones(2, dtype=torch.complex64)})


def test_writing_holds_no_second_copy_of_the_model(tmp_path: Path) -> None:
    """512 MiB of fp16 tensors: a writer that holds every tensor's bytes at once (what safetensors 0.8's
    save_file does) grows the peak by all of it, ours by less than a tenth: measured in a fresh process each, by
    its peak resident memory from the moment the tensors are made (measured: 1024 MiB and 1 MiB)."""
    script = textwrap.dedent(f"""
        import re, sys, torch
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path

        def peak_kib():
            return int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text())[1])

        from dreambooth.models.export import save_checkpoint
        tensors = {{f"w{{i}}": torch.full((64, 1024, 1024), float(i), dtype=torch.float16) for i in range(4)}}
        Path("/proc/self/clear_refs").write_text("5")  # the peak so far (imports, temporaries) set to what is held now
        before = peak_kib()
        if sys.argv[1] == "ours":
            save_checkpoint(Path(sys.argv[2]), tensors, {{"modelspec.title": "x"}})
        else:  # the control: every tensor's bytes built before the write
            blobs = [t.contiguous().view(torch.uint8).numpy().tobytes() for t in tensors.values()]
            Path(sys.argv[2]).write_bytes(b"".join(blobs))
        print((peak_kib() - before) // 1024)
    """)
    grown = {}
    for writer in ("ours", "all at once"):
        out = tmp_path / f"{writer.replace(' ', '-')}.safetensors"
        result = subprocess.run([sys.executable, "-c", script, writer, str(out)], check=True, capture_output=True,
                                text=True, timeout=300)
        grown[writer] = int(result.stdout.split()[-1])
        out.unlink()
    assert grown["all at once"] >= 400, grown  # MiB: the measure sees a copy (else it measures nothing)
    assert grown["ours"] < 52, grown
