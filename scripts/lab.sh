#!/usr/bin/env bash
# Step through the notebooks in JupyterLab with the project's kernel, "Python (almost)".
#   bash scripts/lab.sh                               # opens notebooks/ in a browser
#   bash scripts/lab.sh --no-browser --port 8899      # any further args go to `jupyter lab`
# Sets up first (scripts/setup.sh) when the environment, JupyterLab or the kernel is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ALMOST_VENV:-.venv}
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac

# One python call checks all three: the environment exists, JupyterLab imports, the kernel is known.
if ! "$VENV/bin/python" -c "import jupyterlab, sys
from jupyter_client.kernelspec import KernelSpecManager
sys.exit('almost' not in KernelSpecManager().find_kernel_specs())" 2>/dev/null; then
  bash scripts/setup.sh
fi
export PATH="$VENV/bin:$PATH"

# The server's root is the repository, so results/ and data/ can be browsed too; the file browser
# opens on notebooks/. New notebooks get the project's kernel as well.
root_flag=()
if [ "$(id -u)" = 0 ]; then root_flag=(--allow-root); fi   # containers often run as root
exec python -m jupyterlab --ServerApp.root_dir="$PWD" --LabApp.default_url=/lab/tree/notebooks \
  --MappingKernelManager.default_kernel_name=almost ${root_flag[@]+"${root_flag[@]}"} "$@"
