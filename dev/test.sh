#!/usr/bin/env bash
# Run the test suite on a fresh machine: makes one virtual environment per profile (host = the web UI's
# pins, modern = current releases), installs everything, runs pytest in each. Usage: bash dev/test.sh [host|modern|all] [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
profiles=${1:-all}; shift || true
[ "$profiles" = all ] && profiles="host modern"
for profile in $profiles; do
  venv=".venv-$profile"
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "requirements/$profile.txt" -r requirements/test.txt
  # open_clip_torch only for its CLIP vocabulary file: its dependencies (torchvision) are not wanted.
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps open_clip_torch
  echo "== $profile profile: $("$venv/bin/python" -c 'import torch, transformers, diffusers; print("torch", torch.__version__, "transformers", transformers.__version__, "diffusers", diffusers.__version__)')"
  DREAMBOOTH_PROFILE=$profile "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@" tests
done
