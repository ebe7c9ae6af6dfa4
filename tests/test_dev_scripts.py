"""``dev/test.sh``: a fast default (the web UI's profile without the tests marked slow), ``all`` for CI (both
profiles, every test), and the seconds each profile took. Run here against a stand-in environment."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

FAKE_SETUP = """#!/usr/bin/env bash
mkdir -p "fake-$1/bin"
cat > "fake-$1/bin/python" <<'PY'
#!/usr/bin/env bash
if [ "$1" = -c ]; then echo "torch x transformers y diffusers z"; exit 0; fi
echo "pytest profile=$DREAMBOOTH_PROFILE args=$*" >> calls.txt
PY
chmod +x "fake-$1/bin/python"
echo "fake-$1"
"""


def _run(tmp_path: Path, *args: str) -> tuple[str, list[str]]:
    (tmp_path / "dev").mkdir(exist_ok=True)
    shutil.copy(REPO / "dev" / "test.sh", tmp_path / "dev" / "test.sh")
    (tmp_path / "dev" / "setup.sh").write_text(FAKE_SETUP)
    (tmp_path / "calls.txt").unlink(missing_ok=True)
    done = subprocess.run(["bash", "dev/test.sh", *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout, (tmp_path / "calls.txt").read_text().splitlines()


def test_the_default_is_the_fast_host_run_and_prints_its_seconds(tmp_path):
    out, calls = _run(tmp_path)
    assert calls == ["pytest profile=host args=-m pytest -q -p no:cacheprovider -m not slow tests"]
    assert "== host profile (fast): " in out and out.rstrip().endswith(" s")


def test_all_runs_both_profiles_with_every_test_and_passes_pytest_arguments(tmp_path):
    out, calls = _run(tmp_path, "all", "-k", "export")
    expected = "args=-m pytest -q -p no:cacheprovider -k export tests"
    assert calls == [f"pytest profile={p} {expected}" for p in ("host", "modern")]
    assert out.count(" s\n") == 2 and "== modern profile: " in out


def test_ci_runs_all_and_slow_is_a_declared_marker():
    assert "bash dev/test.sh all" in (REPO / ".ci" / "run").read_text()
    assert '"slow: ' in (REPO / "pyproject.toml").read_text()


def test_dev_only_code_lives_in_dev_not_in_the_package():
    assert not (REPO / "dreambooth" / "demo" / "pretrain.py").exists()
    done = subprocess.run([sys.executable, str(REPO / "dev" / "pretrain_demo_model.py"), "--help"], cwd=REPO.parent,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "{train,export,unpack}" in done.stdout, done.stderr
