#!/usr/bin/env bash
# Create .venv (if missing) and install SAMEmbedding with the CPU build of PyTorch.
# torch is pinned to 2.13.0: that CPU wheel is what `pip install torch==2.13.0` finds on our machines;
# an unpinned torch would pull a multi-GB CUDA build.
# The web extra (samembed web: trame-slicer) pins slicer-core 5.11.0.6, and the MRML tests run on that pin too.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setting up .venv: Python packages, torch's CPU build and Chromium (the first time takes about 2 minutes)"
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
# what is installed is stamped with the package definitions it came from: when they are unchanged, nothing is
# installed again (a second run of the demo reinstalled everything, 7.5 s of its 18 s)
stamp=.venv/.samembed-installed
want="torch==2.13.0 $(cat pyproject.toml benchmarks/pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing SAMEmbedding's packages into .venv"
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[test,web,dataset]"  # web: samembed web; dataset: Dask + Jinja2 for propagate
  # the benchmark package (samembed evaluate / make-suites, the hand benchmark); after the engine it depends on
  python -m pip install -q -e benchmarks
  echo "$want" > "$stamp"
fi
# byte-compile the editable packages as pip does for an installed one: where PYTHONDONTWRITEBYTECODE is set, every
# `samembed` process would otherwise compile the engine's sources again (about 0.07 s of a cold match)
python -m compileall -q SAMEmbedding/samembed SAMEmbedding/SAMEmbeddingLib benchmarks/samembed_bench >/dev/null
# the browser tests (Testing/web) drive Debian's Chromium
bash scripts/install_chromium.sh
