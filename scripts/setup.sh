#!/usr/bin/env bash
# One-time (idempotent) set-up of a Debian/Ubuntu machine for xdplb, as root:
# apt packages, kernel headers that BCC can compile against, bpffs, and a
# virtualenv (.venv) that sees Debian's BCC bindings. Safe to run again.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"

if [ "$(id -u)" != 0 ]; then
  echo "setup.sh: run as root (XDP, bpffs and network namespaces need it)" >&2
  exit 1
fi

log() { printf '[setup] %s\n' "$*"; }

# --- apt packages -----------------------------------------------------------
# python3-bpfcc: BCC compiler + bindings (the PyPI "bcc" is unrelated).
# linux-headers-amd64: UAPI headers for BCC when the running kernel has none.
# iproute2/ethtool/tcpdump/curl/iperf3: the namespace lab and its tests.
# vagrant: `vagrant validate` of the Vagrantfile in tests/test_vagrant.py (~10 s to install).
# systemd: `systemd-analyze verify` of packaging/systemd/xdplb@.service (tests/test_service.py;
# only the binaries are used: PID 1 need not be systemd). util-linux: setpriv, for that test.
# hping3: the SYN flood (random sources) of tests/test_flood.py.
# dnsmasq-base: the DNS server (SRV and A records from a file) of tests/test_discovery.py; the
# binary only, no system service (the dnsmasq package would start one).
# exabgp: the BGP speaker the agent runs for a pool.yaml with `bgp:` (docs/operations.md);
# bird2: the router of the BGP lab (scripts/netns/bgplab.py, tests/test_bgp.py).
pkgs=(python3-bpfcc python3-venv python3-pip linux-headers-amd64 iproute2 ethtool
      tcpdump curl iperf3 util-linux procps kmod nftables vagrant systemd hping3 dnsmasq-base
      exabgp bird2)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Their packages enable system services; xdplb runs its own speaker per instance, and the
  # lab its own BIRD, so the ones installed here are not started (where systemd runs).
  if [ -d /run/systemd/system ]; then
    for svc in exabgp bird; do
      case " ${missing[*]} " in *" $svc"*) systemctl disable --now "$svc" >/dev/null 2>&1 || true;; esac
    done
  fi
fi

# --- kernel headers for BCC -------------------------------------------------
# BCC looks in /lib/modules/$(uname -r)/{build,source}. When the running kernel
# ships no headers (no package, CONFIG_IKHEADERS off) we point both at Debian's
# generic header tree: XDP programs use only UAPI headers, so a version skew is
# harmless. BCC_KERNEL_SOURCE alone does not work on Debian's split layout.
kdir="/lib/modules/$(uname -r)"
if [ ! -e "$kdir/build/include" ] && [ ! -e /sys/kernel/kheaders.tar.xz ]; then
  build=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)
  [ -n "$build" ] || { echo "setup.sh: no /usr/src/linux-headers-*-amd64 tree" >&2; exit 1; }
  common="${build%-amd64}-common"
  log "linking $kdir/build -> $build, source -> $common"
  mkdir -p "$kdir"
  ln -sfn "$build" "$kdir/build"
  ln -sfn "$common" "$kdir/source"
fi

# --- bpffs --------------------------------------------------------------------
if ! mountpoint -q /sys/fs/bpf; then
  log "mounting bpffs on /sys/fs/bpf"
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
fi

# --- virtualenv ---------------------------------------------------------------
# Debian's python3 so that --system-site-packages exposes the bcc module.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
  log "creating .venv (system site packages, for Debian's bcc)"
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
log "installing xdplb and its Python dependencies into .venv"
.venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
.venv/bin/python -c 'import bcc, xdplb' || { echo "setup.sh: bcc or xdplb not importable" >&2; exit 1; }
log "ready: .venv/bin/xdplb"
