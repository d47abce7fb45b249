#!/usr/bin/env bash
# Set-up for the benchmarks only (idempotent), as root: the project's own set-up, then the
# peers and traffic tools the side-by-side runs need, and matplotlib for the plot. The test
# suite does not need any of this, so it is kept out of scripts/setup.sh.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
bash scripts/setup.sh

log() { printf '[bench-setup] %s\n' "$*"; }

# iperf3: TCP throughput; wrk: new connections/s;
# nginx + libnginx-mod-stream, haproxy: proxy peers (and nginx as the HTTP backend for wrk);
# iptables: the kube-proxy DNAT peer.
pkgs=(iperf3 wrk nginx libnginx-mod-stream haproxy iptables)
# One query for all: any package missing (or not fully installed) means an install run.
status="$(dpkg-query -W -f='${db:Status-Status}\n' "${pkgs[@]}" 2>/dev/null || true)"
if [ "$(grep -cx installed <<<"$status")" != "${#pkgs[@]}" ]; then
  log "installing ${pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # nginx and haproxy start a service on install on a systemd machine; the benchmark runs
  # its own instances inside namespaces, so keep the packages' daemons from ever starting.
  guard=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    guard=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' >"$guard"
    chmod +x "$guard"
    trap 'rm -f "$guard"' EXIT
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi

log "installing the bench extras (matplotlib) into .venv"
.venv/bin/pip install -q --disable-pip-version-check -e ".[test,bench]"
.venv/bin/python -c 'import matplotlib' || { echo "bench/setup.sh: matplotlib missing" >&2; exit 1; }
log "ready"
