#!/usr/bin/env bash
# Run the test suite on a fresh machine; each profile gets its own virtual environment (host = the web UI's pins,
# modern = current releases). Usage: bash dev/test.sh [fast|host|modern|all] [pytest args]
#   fast (default): the host profile without the tests marked slow (every test file and every module still runs)
#   host, modern:   that profile, every test;   all: both profiles, every test (what .ci/run runs)
# Prints the seconds each profile took.
set -euo pipefail
cd "$(dirname "$0")/.."
profiles=${1:-fast}; shift || true
[ "$profiles" = all ] && profiles="host modern"
status=0
for profile in $profiles; do
  marker=()
  if [ "$profile" = fast ]; then profile=host; marker=(-m "not slow"); fi
  venv=$(bash dev/setup.sh "$profile")
  echo "== $profile profile${marker:+ (fast: not slow)}: $("$venv/bin/python" -c 'import torch, transformers, diffusers; print("torch", torch.__version__, "transformers", transformers.__version__, "diffusers", diffusers.__version__)')"
  started=$SECONDS
  DREAMBOOTH_PROFILE=$profile "$venv/bin/python" -m pytest -q -p no:cacheprovider "${marker[@]}" "$@" tests || status=$?
  echo "== $profile profile${marker:+ (fast)}: $((SECONDS - started)) s"
done
exit $status
