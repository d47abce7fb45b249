"""CI's guarantee: with XDPLB_STRICT=1 a skipped test fails (a BPF test may never skip)."""

from __future__ import annotations

from pathlib import Path

pytest_plugins = ["pytester"]
CONFTEST = Path(__file__).with_name("conftest.py").read_text()


def test_strict_mode_turns_skips_into_failures(pytester, monkeypatch):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_inner="""
        import pytest

        @pytest.mark.root
        def test_bpf():
            pytest.skip("no BCC here")

        def test_ok():
            pass
    """)
    monkeypatch.setenv("XDPLB_STRICT", "1")
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1, failed=1)
    monkeypatch.setenv("XDPLB_STRICT", "0")
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1, skipped=1)
