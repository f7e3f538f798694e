#!/usr/bin/env bash
# The main job: set up, then run the numbered notebooks headlessly with papermill.
#   bash run_all.sh                                   # the CPU default (no GPU, no hub)
#   CONFIG=data/configs/gpu.yaml bash run_all.sh      # another scale
# Executed notebooks land in results/<run>/notebooks/; stages are resumable, so rerunning after
# an interruption continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")"
CONFIG=${CONFIG:-data/configs/cpu.yaml}
OVERRIDES=${OVERRIDES:-"{}"}
NOTEBOOKS=${NOTEBOOKS:-"01_synthetic_comparisons 02_reward_model"}

bash scripts/setup.sh
VENV=${ALMOST_VENV:-.venv}; case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
export PATH="$VENV/bin:$PATH"
python -m almost_utils.cli setup --config "$CONFIG"     # validates the recipe, converts models once
RUN_DIR=$(python -c "from almost_utils.config import load_config as l; print(l('$CONFIG', '''$OVERRIDES''').run_dir)")
mkdir -p "$RUN_DIR/notebooks"
for nb in $NOTEBOOKS; do
  echo "== notebook $nb ($CONFIG)"
  start=$(date +%s)
  papermill "notebooks/$nb.ipynb" "$RUN_DIR/notebooks/$nb.ipynb" --cwd . \
    -p config_path "$CONFIG" -p overrides "$OVERRIDES" --progress-bar
  secs=$(( $(date +%s) - start ))
  echo "== $nb done in ${secs}s"
  printf '%s\t%s\t%s\t%ss\n' "$(date -u +%FT%TZ)" "$nb" "$CONFIG" "$secs" >> "$RUN_DIR/notebooks/wall_times.tsv"
done
echo "== outputs in $RUN_DIR"
