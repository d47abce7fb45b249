"""Log lines for a terminal or for journald.

journald stamps every line it receives and reads a ``<N>`` syslog priority prefix, so under
it (``$JOURNAL_STREAM`` names our stderr) lines carry the priority instead of a timestamp and
a level name; ``journalctl -p err`` then finds the agent's errors.
"""

from __future__ import annotations

import logging
import os
import sys

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


def under_journald() -> bool:
    """Whether stderr is the stream systemd connected to the journal."""
    want = os.environ.get("JOURNAL_STREAM", "")
    if not want:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        # One entry per line: a multi-line message (a config error) keeps its priority.
        return "\n".join(f"<{prio}>{line}" for line in super().format(record).splitlines())


def setup(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if under_journald():
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
