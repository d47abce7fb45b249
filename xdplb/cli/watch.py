"""Refreshing views (``--watch``): redraw in place like ``top``, or stream JSON lines."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen


def loop(sample: Callable[[], Any], show: Callable[[Any, Any | None], str],
         interval: float, count: int | None = None, in_place: bool = True,
         prime: bool = False) -> None:
    """Every ``interval`` seconds: ``sample()``, then print ``show(current, previous)``.

    ``count`` ends after that many outputs (None: until Ctrl-C). ``prime`` takes a first
    sample that is not shown, so that even the first output has rates. ``in_place``
    redraws the screen (clipped to the terminal height) instead of appending."""
    prev = sample() if prime else None
    shown = 0
    try:
        while count is None or shown < count:
            if prev is not None or shown:
                time.sleep(interval)
            cur = sample()
            text = show(cur, prev)
            if in_place:
                rows = shutil.get_terminal_size().lines
                text = "\n".join(text.splitlines()[: max(rows - 1, 1)])
                sys.stdout.write(CLEAR + text + "\n")
            else:
                sys.stdout.write(text)
            sys.stdout.flush()
            prev, shown = cur, shown + 1
    except KeyboardInterrupt:
        pass
