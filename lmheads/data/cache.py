"""The data cache folder, where tokenizers and token streams are kept between runs.

Files are keyed by a digest of what made them, and written whole or not at all: a reader finds the
whole file or none, and a folder that cannot be written (read-only, full) is one line naming the
option to set.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmheads.errors import ConfigError, failed_write
from lmheads.files import write_whole


def default_cache_dir() -> Path:
    return Path(os.environ.get("LMHEADS_CACHE", Path.home() / ".cache" / "lmheads"))


def digest(obj: dict) -> str:
    """A cache key: the first 20 hex digits of the SHA-256 of ``obj`` as sorted JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def writable(folder: Path) -> Path:
    """The cache folder, created; one line where it cannot be written (a read-only home, a file in the
    way), before the datasets library's page of errors."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise ConfigError(_unwritable(folder, err)) from None
    return folder


def atomic_write(path: Path, write) -> None:
    """``write(tmp)``, then renamed to ``path`` (:func:`lmheads.files.write_whole`); a full disk is one
    line and leaves no partial file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_whole(path, write)
    except OSError as err:
        raise ConfigError(_unwritable(path.parent, err)) from None


@contextmanager
def cache_writes(folder: Path) -> Iterator[None]:
    """What the datasets library writes into the cache ``folder`` (its Arrow files): a full disk is one
    line, not its page of errors."""
    try:
        yield
    except Exception as err:
        if (full := failed_write(err)) is None:
            raise
        raise ConfigError(_unwritable(folder, full)) from None


def _unwritable(folder: Path, err: OSError) -> str:
    free = "free space there, or " if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return (
        f"the data cache {folder} cannot be written ({err.strerror or err}); {free}set data.cache_dir (or "
        "LMHEADS_CACHE) to a folder you can write"
    )
