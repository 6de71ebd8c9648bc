#!/usr/bin/env bash
# Sets up .venv with gdro-ray and everything it needs, on a fresh machine. Safe to rerun.
#   TORCH_SPEC  which torch to install first (default: torch==2.13.0; on a machine without a GPU point
#               pip at a CPU build, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu)
#   TORCH_INDEX optional index URL for that torch
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch first, so that nothing below pulls a different (CUDA) build of several GB.
python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
# DeepSpeed builds from source; compile its CPU ops once here instead of at every first use.
if ! python -c "import deepspeed" 2>/dev/null; then
    python -m pip install --quiet setuptools wheel ninja
    DS_BUILD_SHM_COMM=1 DS_BUILD_CPU_ADAM=1 python -m pip install --quiet --no-build-isolation deepspeed
fi
python -m pip install --quiet -e ".[dev]"
