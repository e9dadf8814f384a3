#!/usr/bin/env bash
# Installs lmms-eval (the pin of pyproject.toml's `lmms` extra) into its own
# environment, ./.venv-lmms by default, for benchmarks/quality/lmms_eval_run.py.
#
#   scripts/setup.sh && scripts/setup_lmms.sh
#
# lmms-eval cannot share .venv: it requires ruff>=0.16.4 (the [test] extra pins
# ruff 0.14.6) and protobuf<7 (through wandb). It is only an HTTP client of
# the server, so .venv-lmms sees .venv's packages (torch, transformers,
# datasets' dependencies...) through a .pth file and adds only what lmms-eval
# needs on top; a constraints file of .venv's versions, less ruff, protobuf and
# filelock, keeps pip from asking for anything else in another version.
# filelock<4: lmms-eval 0.7.3 imports filelock._api (gone in filelock 4, which
# .venv has) without declaring the bound.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE="${VENV:-.venv}"
LMMS="${LMMS_VENV:-.venv-lmms}"
[[ -x "$BASE/bin/python" ]] || { echo "run scripts/setup.sh first ($BASE)" >&2; exit 1; }

pin="$("$BASE/bin/python" -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["lmms"])')"
if [[ ! -x "$LMMS/bin/python" ]]; then
  "$BASE/bin/python" -m venv --without-pip "$LMMS"
fi
site() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
site "$BASE/bin/python" > "$(site "$LMMS/bin/python")/project_venv.pth"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$BASE/bin/python" -m pip --disable-pip-version-check freeze --exclude-editable \
  | grep -v -i -E '^(ruff|protobuf|filelock)==|^-e |@ ' > "$constraints"
# pip itself comes from .venv through the .pth file; it installs into .venv-lmms.
"$LMMS/bin/python" -m pip --disable-pip-version-check install -q -c "$constraints" "$pin" 'filelock<4'
echo "setup done: $LMMS ($pin)"
