#!/usr/bin/env bash
# Set up (as run_all.sh does) and run the test suite. CI calls exactly this.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
VENV=${ALMOST_VENV:-.venv}; case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
export PATH="$VENV/bin:$PATH"
python -m almost_utils.cli setup --config data/configs/tiny.yaml   # tokenizer + benchmark data
# SmolLM2 (pad token == end token) exercises the reward model's pad-token handling
python -c "from almost_utils.models import convert_packaged; convert_packaged('smollm2-135m-instruct')"
python -m pytest -q "$@"
