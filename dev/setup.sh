#!/usr/bin/env bash
# Make (or update) the virtual environment of one profile and print its path.
# Usage: bash dev/setup.sh host|modern   (host = the web UI's pins, modern = current releases)
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:?usage: dev/setup.sh host|modern}
venv=".venv-$profile"
pip_quiet=(-q --disable-pip-version-check)
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" >&2
fi
"$venv/bin/python" -m pip install "${pip_quiet[@]}" torch==2.13.0 >&2
"$venv/bin/python" -m pip install "${pip_quiet[@]}" -r "requirements/$profile.txt" -r requirements/test.txt >&2
# open_clip_torch only for the CLIP vocabulary it ships: its dependencies (torchvision) are not wanted.
"$venv/bin/python" -m pip install "${pip_quiet[@]}" --no-deps open_clip_torch >&2
echo "$venv"
