#!/bin/sh
# Container entry point: `vllm serve "$MODEL" --plugin trio ...` with defaults from the environment.
#
#   MODEL            model id or path            (default llava-hf/llava-v1.6-vicuna-7b-hf)
#   TRIO_KEEP_RATIO  default keep ratio, (0, 1]  (default 0.25)
#   TRIO_DEPTH       decoder layer scored by TRIO (default 2)
#   HOST, PORT       where to listen             (default 0.0.0.0, 8000)
#   EXTRA_ARGS       more `vllm serve` flags, split on whitespace (default none)
#
# Arguments given to `docker run IMAGE ...` are appended last, with their
# quoting intact: use them for values that contain spaces (JSON, for example),
# and to override anything above (for vLLM the last occurrence of a flag wins).
# `exec` replaces this shell, so vLLM runs as PID 1 and gets `docker stop`'s SIGTERM.
set -eu

MODEL="${MODEL:-llava-hf/llava-v1.6-vicuna-7b-hf}"
TRIO_KEEP_RATIO="${TRIO_KEEP_RATIO:-0.25}"
TRIO_DEPTH="${TRIO_DEPTH:-2}"
HOST="${HOST:-0.0.0.0}"
PORT="${PORT:-8000}"
EXTRA_ARGS="${EXTRA_ARGS:-}"

# Split EXTRA_ARGS on whitespace without glob expansion, and put it in front
# of the docker-run arguments.
set -f
# shellcheck disable=SC2086 # word splitting of EXTRA_ARGS is the documented behaviour
set -- $EXTRA_ARGS "$@"
set +f

exec vllm serve "$MODEL" \
    --plugin trio \
    --trio-keep-ratio "$TRIO_KEEP_RATIO" \
    --trio-depth "$TRIO_DEPTH" \
    --host "$HOST" \
    --port "$PORT" \
    "$@"
