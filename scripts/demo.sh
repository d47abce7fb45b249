#!/usr/bin/env bash
# Set up the machine (idempotent), then run the namespace demo: 400 HTTP connections
# balanced 3:1 by xdplb in native XDP. Run as root. Arguments go to demo.py, e.g.
# `--forwarding fullnat|dsr-l2|dsr-ipip` (default nat) for the other forwarding modes, and
# `--scheduler wrr|rr|random|source-hash|least-conn` (default maglev): wrr gives exactly 300/100.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
bash scripts/setup.sh
exec .venv/bin/python scripts/netns/demo.py "$@"
