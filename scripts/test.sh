#!/usr/bin/env bash
# Set up the environment (see setup_env.sh) and run every test. Real-data tests read ../shared/data
# (or $SAMEMBED_DATA) and are skipped with a message when it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
# Two pytest workers (pytest-xdist) of one thread each: many tests spend their time in Python, in reading and in
# child processes rather than in torch's threads, so two single-thread workers use two cores better than one
# two-thread process (CI on a 2-core machine: 9.7 min of tests against 16.6). `--dist loadfile` keeps each test
# file, and its module-scope fixtures (embedded real CT pairs), in one worker. (The single process peaked at 5.1 GB;
# two workers' memory was not measured, and these machines have 24 GB.)
# SAMEMBED_TEST_WORKERS=0 runs the tests in this process, as pytest alone does.
WORKERS=${SAMEMBED_TEST_WORKERS:-2}
if [ "$WORKERS" -gt 0 ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  PARALLEL=(-n "$WORKERS" --dist loadfile)
else
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
  PARALLEL=()
fi
# lint first (pyproject.toml [tool.ruff.lint]: pycodestyle, pyflakes, isort, bugbear, pyupgrade, pytest, simplify)
python -m ruff check .
# the tests, plus the docstrings' examples (doctests) of the engine and of the benchmark package
python -m pytest -q -rs --durations=15 "${PARALLEL[@]}" Testing "$@"   # the 15 slowest tests: where CI time goes
python -m pytest -q --doctest-modules SAMEmbedding/samembed benchmarks/samembed_bench
