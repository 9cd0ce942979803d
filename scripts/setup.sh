#!/usr/bin/env bash
# Idempotent set-up: .venv/ in the project root with torch (CPU wheel unless a build is already
# installed) and the project in editable mode. Re-running does nothing when pyproject.toml and this script are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=".venv/.ladd-installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  start=$(date +%s)
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch 2.13.0: the CPU wheel here; a CUDA build installed beforehand satisfies this and is kept.
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install --quiet "torch==2.13.0"
  .venv/bin/python -m pip install --quiet -e ".[dev]" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  # evaluate.features: inception uses torch-fidelity's FID network. Its torchvision dependency has no build for
  # the CPU-only torch wheel (and a bare one pulls another torch): ladd needs only its pure-torch Inception module.
  .venv/bin/python -m pip install --quiet --no-deps "torch-fidelity==0.4.0" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  rm -f .venv/.ladd-installed-*
  touch "$stamp"
  echo "setup: installed in $(( $(date +%s) - start )) s"
fi
