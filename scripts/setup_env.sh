#!/usr/bin/env bash
# Create .venv (if missing) and install SAMEmbedding with the CPU build of PyTorch.
# torch is pinned to 2.13.0: that CPU wheel is what `pip install torch==2.13.0` finds on our machines;
# an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,dataset]"  # dataset: Dask + Jinja2 for samembed propagate
