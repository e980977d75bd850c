#!/usr/bin/env bash
# Set up the environment and run the demo: match the POPI landmarks from the POPI CT into a deformed copy,
# print matched points, errors and timings, and write a heatmap PNG (demo_output/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python scripts/demo.py "$@"
