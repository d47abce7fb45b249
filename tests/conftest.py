"""Shared fixtures. Tests marked ``root`` need root, BCC, XDP and network namespaces; CI
runs them and treats a skip as a failure (see .ci/run)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts" / "netns"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "root" in item.keywords and os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason="needs root (deselect with -m 'not root')"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With XDPLB_STRICT=1 (CI), a skipped test is a failed test: the real data path must
    run, not be skipped because a machine lacks root, BCC or namespaces."""
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and os.environ.get("XDPLB_STRICT") == "1" and not hasattr(rep, "wasxfail"):
        rep.outcome = "failed"
        rep.longrepr = f"skipped in strict mode (XDPLB_STRICT=1): {rep.longrepr}"
