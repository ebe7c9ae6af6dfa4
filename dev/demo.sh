#!/usr/bin/env bash
# The main job on a fresh machine: set up the environment, then train the built-in demo model and print
# what it learned. Usage: bash dev/demo.sh [python -m dreambooth demo args, e.g. --quick]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(bash dev/setup.sh host)
"$venv/bin/python" -m dreambooth demo "$@"
