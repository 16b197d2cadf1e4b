#!/usr/bin/env bash
# What CI needs for the docker and bwrap sandbox tests (no systemd needed):
#   sandboxes/ci-setup.sh install  install docker.io, debootstrap, bubblewrap and chromium (the report test) if missing
#   sandboxes/ci-setup.sh start    install; start dockerd (pidfile) unless one runs; build the image
#   sandboxes/ci-setup.sh stop     stop the dockerd this script started (by its pid), and only that one
# Run as root (or with sudo available). PYTHON picks the interpreter for sandboxes/build (default: python3).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
pidfile=/run/pipemend-dockerd.pid
log=${PIPEMEND_DOCKERD_LOG:-/tmp/pipemend-dockerd.log}
sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"

started_marker=/run/pipemend-dockerd.started

install() {
  local need=()
  command -v dockerd >/dev/null || need+=(docker.io)
  command -v debootstrap >/dev/null || need+=(debootstrap)
  command -v bwrap >/dev/null || need+=(bubblewrap)
  command -v chromium >/dev/null || need+=(chromium)
  command -v iptables >/dev/null || need+=(iptables)
  command -v shellcheck >/dev/null || need+=(shellcheck)   # tests/test_ghactions_lint.py
  if [ ${#need[@]} -gt 0 ]; then
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${need[@]}"
  fi
}

start() {
  install
  if ! docker info >/dev/null 2>&1; then
    $sudo rm -f "$pidfile"
    $sudo sh -c "dockerd --storage-driver overlay2 --pidfile $pidfile > $log 2>&1 &"
    $sudo touch "$started_marker"
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { echo "dockerd did not start; see $log" >&2; tail -20 "$log" >&2; exit 1; }
  fi
  $sudo env PIPEMEND_CACHE="${PIPEMEND_CACHE:-}" "${PYTHON:-python3}" "$here/build"
}

stop() {
  [ -f "$started_marker" ] || return 0   # not ours: leave it running
  $sudo rm -f "$started_marker"
  if [ -f "$pidfile" ]; then
    pid="$(cat "$pidfile")"
    $sudo kill "$pid" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  fi
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
