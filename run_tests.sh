#!/usr/bin/env bash
# Set up (as run_all.sh does) and run the test suite. CI calls exactly this.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
. "${ALMOST_VENV:-.venv}/bin/activate"
python -m almost_utils.cli setup --config data/configs/tiny.yaml   # tokenizer + benchmark data
python -m pytest -q "$@"
