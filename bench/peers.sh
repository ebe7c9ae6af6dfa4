#!/usr/bin/env bash
# The one GPU call of bench/peers.py: install the carried wheels, then run every row within the time budget.
# Usage, in the repository root on the GPU machine (carrying .whl and build, made by `bench/peers.py prepare`):
#   bash bench/peers.sh OUT [bench/peers.py run arguments: --runs ..., --budget S, ...]
# .whl/*.whl go to /tmp/site (the engine's and diffusers' packages); .whl/kohya/*.whl to /tmp/site-kohya, which
# bench/peers.py puts first on PYTHONPATH for kohya's rows alone (the transformers and diffusers sd-scripts pins).
set -u
out=${1:?usage: bash bench/peers.sh OUT [peers.py run arguments]}
shift
install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"; }
install /tmp/site .whl/*.whl && install /tmp/site-kohya .whl/kohya/*.whl || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1  # no network there: fail at once rather than wait on the hub
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
exec python3 bench/peers.py run --out "$out" --kohya-site /tmp/site-kohya "$@"
