"""The exceptions that end a command with a message instead of a traceback.

The CLI turns a ``ConfigError`` (bad user input) into a single ``error: ...`` line and exit status 2, so
every message must say what is wrong *and* what to do about it; a ``TrainingStopped`` (a NaN loss, a
checkpoint that could not be written) into an ``error:`` line and its own status (3, 4), and so a write
elsewhere that failed for want of space or on a read-only file system (:func:`failed_write`: a log) with
4; an ``Interrupted`` into an ``interrupted:`` line and 130 or 143. A command's output folder that cannot
be made (a file in its path) is a ``ConfigError`` too (:func:`make_folder`).
"""

import errno
import importlib.util
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path


class ConfigError(ValueError):
    """Invalid configuration or input data; the message tells the user how to fix it."""


def require(purpose: str, extra: str | None, *modules: str) -> None:
    """Raise a :class:`ConfigError` when a module ``purpose`` needs is not installed, naming the lmheads
    extra (``pyproject.toml``) that installs it, if any; call it before anything is written."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        names = " and ".join([", ".join(missing[:-1]), missing[-1]] if len(missing) > 1 else missing)
        install = f"pip install {' '.join(missing)}"
        if extra is not None:
            install = f'pip install -e ".[{extra}]" in lmheads\' folder (or {install})'
        raise ConfigError(f"{purpose} needs {names}, not installed: {install}")


def file_in_the_way(folder: Path) -> str | None:
    """Why ``folder`` cannot be a folder, where a file stands at it or at one of its parents (checked
    before anything is written); ``None`` where none does."""
    file = next(p for p in (folder, *folder.parents) if p.exists())
    if file.is_dir():
        return None
    return f"{folder} is a file" if file == folder else f"{folder} cannot be made: {file} is a file"


def make_folder(folder: Path, instead: str) -> None:
    """Create ``folder`` and its parents, or raise a :class:`ConfigError` saying why not (a file in its
    path, a folder that cannot be written) and what to give ``instead``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        why = file_in_the_way(folder) or f"{folder} cannot be made: {err.strerror or err}"
        raise ConfigError(f"{why}; {instead}") from None


class TrainingStopped(RuntimeError):
    """Training cannot go on; the message says where it stopped and how to continue."""

    exit_code = 1


class NonFiniteLossError(TrainingStopped):
    """The training loss became NaN or infinite at ``step``; training stops without checkpointing that
    state."""

    exit_code = 3

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class CheckpointWriteError(TrainingStopped):
    """A checkpoint, or at the end of training ``results.json``, could not be written (a full disk, a
    quota, a folder made read-only); training stops there, and the checkpoints written before it are
    whole."""

    exit_code = 4


def causes(err: BaseException | None) -> Iterator[BaseException]:
    """``err`` and the exceptions behind it (``raise ... from``, or raised while handling them), in turn."""
    seen = set()
    while err is not None and id(err) not in seen:
        yield err
        seen.add(id(err))
        err = err.__cause__ or err.__context__


#: Why a write fails that is mended outside lmheads, and how: a full disk or quota, a read-only file system.
_MENDS = {errno.ENOSPC: "free space there", errno.EDQUOT: "free space there", errno.EROFS: "make it writable"}


def failed_write(err: BaseException) -> OSError | None:
    """The write behind ``err`` that failed for want of space (a full disk, a quota) or on a read-only
    file system, if one did: an ``OSError``, or one made from a Rust library's I/O error (safetensors':
    "... (os error 28)")."""
    for cause in causes(err):
        if isinstance(cause, OSError) and cause.errno in _MENDS:
            return cause
        rust = re.search(r"\(os error (\d+)\)", str(cause))
        if rust and int(rust[1]) in _MENDS:
            return OSError(int(rust[1]), os.strerror(int(rust[1])))
    return None


def mend(err: OSError) -> str:
    """What to do about a :func:`failed_write` where it failed: ``free space there``, ``make it writable``."""
    return _MENDS.get(err.errno, "make it writable")


class Interrupted(BaseException):
    """The command was stopped by SIGINT or SIGTERM (in training, after saving a checkpoint to resume
    from). Not an ``Exception``, as ``KeyboardInterrupt`` is not: a library's ``except Exception`` around
    the code the signal lands in (a fallback when compiling fails, say) must not take it for a failure
    and go on."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def interrupted_outside_training(signum: int) -> Interrupted:
    """How Ctrl-C or SIGTERM ends a command outside training, where there is nothing to save."""
    return Interrupted(f"{signal.Signals(signum).name} outside training: nothing was saved", 128 + signum)
