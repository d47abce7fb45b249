#!/usr/bin/env bash
# Set up the machine (idempotent) and run the whole test suite, as root. In strict mode
# (the default here, and in CI) a skipped test counts as a failure: the BPF/XDP/namespace
# tests must run. Extra arguments go to pytest (e.g. -k maglev, or -m 'not root').
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
bash scripts/setup.sh
export XDPLB_STRICT="${XDPLB_STRICT:-1}"
.venv/bin/ruff check xdplb tests scripts bench
.venv/bin/lint-imports   # the layer contracts in pyproject.toml ([tool.importlinter])
exec .venv/bin/python -m pytest -ra -p no:cacheprovider "$@"
