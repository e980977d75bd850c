#!/usr/bin/env bash
# Set up the environment (see setup_env.sh) and run every test. Real-data tests read ../shared/data
# (or $SAMEMBED_DATA) and are skipped with a message when it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# lint first (pyproject.toml [tool.ruff.lint]: pycodestyle, pyflakes, isort, bugbear, pyupgrade, pytest, simplify)
python -m ruff check .
# the tests, plus the docstrings' examples (doctests) of the engine and of the benchmark package
python -m pytest -q -rs --durations=15 Testing "$@"   # the 15 slowest tests: where CI time goes
python -m pytest -q --doctest-modules SAMEmbedding/samembed benchmarks/samembed_bench
