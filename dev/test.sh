#!/usr/bin/env bash
# Run the whole test suite on a fresh machine, once per profile (host = the web UI's pins, modern = current
# releases); each gets its own virtual environment. Usage: bash dev/test.sh [host|modern|all] [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
profiles=${1:-all}; shift || true
[ "$profiles" = all ] && profiles="host modern"
for profile in $profiles; do
  venv=$(bash dev/setup.sh "$profile")
  echo "== $profile profile: $("$venv/bin/python" -c 'import torch, transformers, diffusers; print("torch", torch.__version__, "transformers", transformers.__version__, "diffusers", diffusers.__version__)')"
  DREAMBOOTH_PROFILE=$profile "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@" tests
done
