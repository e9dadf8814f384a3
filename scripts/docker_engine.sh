#!/usr/bin/env bash
# Makes a Docker engine answer on this machine, or stops the one this script started.
#
#   scripts/docker_engine.sh start   prints "running" (an engine already answered:
#                                    leave it alone) or "started" (stop it later)
#   scripts/docker_engine.sh stop    stops the dockerd that `start` started, if any
#
# `start` installs Debian's docker.io when dockerd is missing (needs root and
# apt), then runs dockerd the way it works on the project's CI machines, which
# are containers themselves: no iptables, no default bridge (containers run with
# --network host or none) and the vfs storage driver (no overlay mounts; it
# copies every layer in full, so images should have few layers). The daemon's
# log is $TRIO_DOCKERD_LOG; its PID file $TRIO_DOCKERD_PIDFILE marks it as ours.
set -euo pipefail

PIDFILE="${TRIO_DOCKERD_PIDFILE:-/run/vllm-trio-dockerd.pid}"
LOG="${TRIO_DOCKERD_LOG:-${TMPDIR:-/tmp}/vllm-trio-dockerd.log}"
DOCKER="${DOCKER:-docker}"

answers() { "$DOCKER" info >/dev/null 2>&1; }

start() {
  if answers; then
    echo running
    return
  fi
  if [[ "$(id -u)" != 0 ]]; then
    echo "no Docker engine answers and starting one needs root" >&2
    exit 1
  fi
  if ! command -v dockerd >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q docker.io >&2 || { apt-get update -q >&2 && apt-get install -y -q docker.io >&2; }
  fi
  dockerd --iptables=false --bridge=none --storage-driver=vfs --pidfile "$PIDFILE" >"$LOG" 2>&1 &
  for _ in $(seq 120); do
    if answers; then
      echo started
      return
    fi
    sleep 0.5
  done
  echo "dockerd did not answer within 60 s; its log, $LOG:" >&2
  tail -n 20 "$LOG" >&2
  exit 1
}

stop() {
  [[ -f "$PIDFILE" ]] || return 0
  local pid
  pid="$(cat "$PIDFILE")"
  kill -TERM "$pid" 2>/dev/null || true
  # dockerd stops its containers (10 s each) and its containerd first.
  for _ in $(seq 120); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "dockerd $pid still running after 60 s" >&2
    exit 1
  fi
  rm -f "$PIDFILE"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
