#!/usr/bin/env bash
# The main job: set up, then run the numbered notebooks headlessly with papermill.
#   bash run_all.sh                                   # the CPU default (no GPU, no hub)
#   CONFIG=data/configs/gpu.yaml bash run_all.sh      # another scale
#   OVERRIDES='{"run_name": "cpu-40q", "queries.num_queries": 40}' bash run_all.sh   # a variant, own folder
#   FRESH=1 bash run_all.sh                           # recompute from nothing, then a reproduction report
# Executed notebooks land in results/<run>/notebooks/. Stages are resumable: rerunning after an
# interruption continues where it stopped. A stage whose folder holds outputs of another recipe
# stops the run before any model loads (the message names the fields that changed).
set -euo pipefail
cd "$(dirname "$0")"
CONFIG=${CONFIG:-data/configs/cpu.yaml}
OVERRIDES=${OVERRIDES:-"{}"}
NOTEBOOKS=${NOTEBOOKS:-}                    # default: every notebook the recipe has sections for (cli notebooks)
FRESH=${FRESH:-0}

bash scripts/setup.sh
VENV=${ALMOST_VENV:-.venv}; case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
export PATH="$VENV/bin:$PATH"
cli() { python -m almost_utils.cli "$@" --config "$CONFIG" --overrides "$OVERRIDES"; }

cli setup                                   # validates the recipe, converts models once
NOTEBOOKS=${NOTEBOOKS:-$(cli notebooks)}
REFERENCE=$(cli where)
if [ "$FRESH" = 1 ]; then                   # the same recipe, recomputed in a folder of its own
  FRESH_DIR=$(cli where --fresh)
  OVERRIDES=$(python -c 'import json, sys, yaml; o = yaml.safe_load(sys.argv[1]) or {}; o["output_dir"] = sys.argv[2]; print(json.dumps(o))' "$OVERRIDES" "$FRESH_DIR")
fi
cli check                                   # reuse / resume / stop, per stage, before any model loads
RUN_DIR=$(cli where)
mkdir -p "$RUN_DIR/notebooks"

# Long stages report progress to this file; follow it here so the terminal shows what runs.
# Loading bars of transformers / the hub stay out of the executed notebooks.
export ALMOST_PROGRESS_LOG="$RUN_DIR/notebooks/progress.log" HF_HUB_DISABLE_PROGRESS_BARS=1
: > "$ALMOST_PROGRESS_LOG"
tail -n 0 -F "$ALMOST_PROGRESS_LOG" 2>/dev/null &
TAIL_PID=$!
trap 'kill $TAIL_PID 2>/dev/null || true' EXIT

for nb in $NOTEBOOKS; do
  echo "== notebook $nb ($CONFIG -> $RUN_DIR)"
  start=$(date +%s)
  papermill "notebooks/$nb.ipynb" "$RUN_DIR/notebooks/$nb.ipynb" --cwd . \
    -p config_path "$CONFIG" -p overrides "$OVERRIDES" --no-progress-bar
  secs=$(( $(date +%s) - start ))
  sleep 1                                   # let tail print the notebook's last lines
  echo "== $nb done in ${secs}s"
  printf '%s\t%s\t%s\t%ss\n' "$(date -u +%FT%TZ)" "$nb" "$CONFIG" "$secs" >> "$RUN_DIR/notebooks/wall_times.tsv"
done
if [ "$FRESH" = 1 ] && [ -d "$REFERENCE" ]; then
  echo "== reproduction report ($RUN_DIR against $REFERENCE)"
  python -m almost_utils.cli reproduce --reference "$REFERENCE" --run "$RUN_DIR"
fi
echo "== outputs in $RUN_DIR"
