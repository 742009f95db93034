"""What a running study shows in the terminal.

On a terminal, one status line (trials done / running / pending, epochs of the running
trials, time left) is redrawn in place about once a second, and event lines (a trial ended,
a retry, the tracking store went away) are printed above it. When the output is a file or a
pipe (a batch job's log), the status is printed as a plain line every HEARTBEAT_S seconds
instead, so logs stay readable.
"""
from __future__ import annotations

import shutil
import sys
import threading
from typing import TextIO

LIVE_PERIOD_S = 1.0
HEARTBEAT_S = 30.0
CLEAR = "\r\033[K"   # back to column 0, erase to the end of the line


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """Event lines and a status line on one stream; `live` redraws the status in place."""

    def __init__(self, stream: TextIO | None = None, live: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.live = is_terminal(self.stream) if live is None else live
        self.period = LIVE_PERIOD_S if self.live else HEARTBEAT_S
        self.shown = ""            # the status line now on screen (live mode)
        self.lock = threading.Lock()  # the MLflow writer thread prints events too

    def line(self, text: str) -> None:
        """An event: a line of its own, kept above the status line."""
        with self.lock:
            if self.live and self.shown:
                self.stream.write(CLEAR + text + "\n" + self.shown)
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    def status(self, text: str) -> None:
        """The current state: redrawn in place when live, a plain line otherwise."""
        with self.lock:
            if self.live:
                width = shutil.get_terminal_size((120, 24)).columns - 1
                self.shown = text if len(text) <= width else text[:width - 1] + "…"
                self.stream.write(CLEAR + self.shown)
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        """Erase the status line, so what follows starts on a clean line."""
        with self.lock:
            if self.live and self.shown:
                self.stream.write(CLEAR)
                self.stream.flush()
            self.shown = ""


def clock(seconds: float) -> str:
    """1h02m03s, or 2m03s under an hour."""
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
