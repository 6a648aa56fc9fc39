"""Lines for people on stderr, one write each."""

from __future__ import annotations

import sys


def stderr_line(text: str) -> None:
    """Writes `text` and its newline to stderr in one write. print() writes them separately, and with
    PYTHONUNBUFFERED (the launchers set it) each write reaches the stream on its own: when every rank of a job reports
    the same error into one stream, rank 1's line lands between rank 0's text and its newline."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def error_line(prog: str, error: BaseException | str) -> None:
    """`prog: error: message`, the message folded onto one line."""
    stderr_line(f"{prog}: error: {' '.join(str(error).split())}")
