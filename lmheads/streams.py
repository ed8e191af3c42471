"""Output that survives a closed pipe, for the commands and the tools. Standard library only, so that a
tool that starts no training (``tools/sweep.py``) can use it without importing torch."""

from __future__ import annotations

import contextlib
import os
import sys


class PipeSafeStream:
    """A text stream that goes quiet, instead of raising, once its reader has gone: ``fit ... | tee log``
    stopped with Ctrl-C closes the pipe first, and a progress bar's next write must not cost the run its
    checkpoint. The file descriptor then points to /dev/null, so later writes and the flush at exit pass."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self._gone = False

    def write(self, text: str) -> int:
        if not self._gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._reader_gone()
        return len(text)

    def flush(self) -> None:
        if not self._gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._reader_gone()

    def _reader_gone(self) -> None:
        self._gone = True
        with contextlib.suppress(OSError, ValueError):  # a stream without a descriptor (captured)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def pipe_safe_output():
    """``sys.stdout`` and ``sys.stderr`` wrapped in :class:`PipeSafeStream` for the command's duration."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = PipeSafeStream(sys.stdout), PipeSafeStream(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
