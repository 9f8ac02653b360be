"""What a command prints: its answers, one progress line per job, and errors in one line.

Everything else goes to a log file (`-v` shows it on the terminal instead): our own INFO logs,
Python warnings, TensorFlow's and absl's C++ logs, LiteRT's delegate notice, Ray's notices and Ray
Data's progress blocks. The C++ libraries write to file descriptor 2 directly, so a quiet command
points descriptor 2 at the log file and keeps a copy of the terminal's for its own lines. Ray's
workers log to Ray's own files (`/tmp/ray/session_latest/logs`); a quiet driver does not stream
them (`ray.init(log_to_driver=False)`, see dogbread.runtime), locally or under `ray job submit`.

Used as a library (no `session`), dogbread leaves logging and Ray's defaults alone.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import TextIO

LOG_DIR_ENV = "DOGBREAD_LOG_DIR"  # where quiet commands write their log files
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_terminal: TextIO | None = None  # the terminal's stderr while a quiet session runs
_quiet = False


def verbose() -> bool:
    """Whether Ray's and the libraries' output may reach the terminal (False in a quiet command)."""
    return not _quiet


def terminal() -> TextIO:
    """Where progress lines and warnings for the user go: the terminal's stderr."""
    return _terminal or sys.stderr


def log_dir() -> str:
    default = os.path.join(tempfile.gettempdir(), f"dogbread-{os.getuid()}", "logs")
    return os.environ.get(LOG_DIR_ENV) or default


@contextlib.contextmanager
def session(command: str, verbose: bool) -> Iterator[str | None]:
    """Route one command's output (see the module docstring); yields the log file's path, or None
    with `verbose`, when everything goes to the terminal as the libraries print it."""
    global _terminal, _quiet
    if verbose:
        logging.basicConfig(level=logging.DEBUG, format=FORMAT, datefmt="%H:%M:%S")
        yield None
        return
    os.makedirs(log_dir(), exist_ok=True)
    path = os.path.join(log_dir(), f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    # Left open at the end: handlers that Ray or TensorFlow bound to it may still write.
    log = open(path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
    saved_stderr, saved_fd = sys.stderr, os.dup(2)
    terminal = _terminal_stream(saved_stderr, saved_fd)
    root, ours = logging.getLogger(), logging.getLogger("dogbread")
    to_log, to_terminal = logging.StreamHandler(log), logging.StreamHandler(terminal)
    to_log.setFormatter(logging.Formatter(FORMAT))
    to_terminal.setFormatter(logging.Formatter("dogbread: %(levelname)s: %(message)s"))
    to_terminal.setLevel(logging.WARNING)  # our warnings the user must see, e.g. "waits for a GPU"
    saved_level = root.level
    sys.stderr.flush()
    os.dup2(log.fileno(), 2)
    sys.stderr, _terminal, _quiet = log, terminal, True
    root.addHandler(to_log)
    root.setLevel(logging.INFO)
    ours.addHandler(to_terminal)
    try:
        yield path
    finally:
        log.flush()
        terminal.flush()
        ours.removeHandler(to_terminal)
        root.removeHandler(to_log)
        root.setLevel(saved_level)
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        sys.stderr, _terminal, _quiet = saved_stderr, None, False


def _terminal_stream(stderr: TextIO, saved_fd: int) -> TextIO:
    """The stream for our own lines: the Python stderr we were given, unless it writes to
    descriptor 2, which is about to become the log file; then a stream on a copy of descriptor 2."""
    try:
        on_fd2 = stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a capture object, such as pytest's
        on_fd2 = False
    if not on_fd2:
        return stderr
    encoding = getattr(stderr, "encoding", None) or "utf-8"
    return open(saved_fd, "w", buffering=1, encoding=encoding, closefd=False)  # noqa: SIM115


class ProgressLine:
    """A job's progress line on the terminal: redrawn in place on a terminal (at most every
    0.5 s), else printed whole at most every `every_s` seconds (0: every update)."""

    def __init__(self, every_s: float) -> None:
        self.every_s, self.shown, self.open = every_s, -math.inf, False

    def update(self, line: str, force: bool = False) -> None:
        stream = terminal()
        tty, now = stream.isatty(), time.monotonic()
        if not force and now - self.shown < (0.5 if tty else self.every_s):
            return
        self.shown = now
        if tty:  # \x1b[K clears what a longer earlier line left
            print("\r" + line + "\x1b[K", end="", file=stream, flush=True)
            self.open = True
        else:
            print(line, file=stream, flush=True)

    def close(self) -> None:
        """End the line on a terminal (the last update stays)."""
        if self.open:
            print(file=terminal(), flush=True)
            self.open = False


def eta(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"ETA {seconds // 60}:{seconds % 60:02d}"
