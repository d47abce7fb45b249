#!/usr/bin/env bash
# The differential fuzz (a developer's tool, not part of the package), as root:
# bash scripts/fuzz.sh --frames 5000000 --seed 7. Arguments go to tests/testkit/fuzz_cli.py.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here/tests"
exec "$here/.venv/bin/python" -m testkit.fuzz_cli "$@"
