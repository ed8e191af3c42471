"""Files written whole or not at all, and the records of a run read back.

A reader finds the whole file or none: it is written beside its name and renamed into place, which is
atomic within one folder, so a process killed mid-write or a disk that fills leaves the file as it was.
A record that does not parse anyway (a copy cut short, an edit) is one line naming it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import yaml

from lmheads.errors import ConfigError


def remove(path: Path) -> None:
    """Remove the file ``path`` if it is there: a read-only file system refuses to remove even a file that
    is not, which would replace the error that brought the caller here."""
    if path.exists():
        path.unlink()


def write_whole(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to a file beside ``path``, then renamed to it; an ``OSError`` (a full disk) leaves
    no partial file and ``path`` as it was."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        tmp.replace(path)
    except OSError as err:
        err.filename = err.filename or str(path)  # a failed write names no file: the one it was for
        raise
    finally:
        remove(tmp)


def write_json(path: Path, record: dict) -> None:
    """``record`` as indented JSON at ``path``, whole or not at all."""
    write_whole(path, lambda tmp: tmp.write_text(json.dumps(record, indent=2, default=str) + "\n"))


def read_record(path: Path) -> dict:
    """A JSON or YAML record of a run (``results.json``, ``hparams.yaml``, ...) as a dict, ``{}`` where
    there is none; a :class:`ConfigError` naming it where it does not parse as one."""
    if not path.is_file():
        return {}
    try:
        text = path.read_text()
        record = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        why = f"{err.problem} at line {err.problem_mark.line + 1}" if err.problem_mark else str(err.problem)
    except (OSError, ValueError, yaml.YAMLError) as err:  # ValueError: JSON's, and text that is not UTF-8
        why = str(err) or type(err).__name__
    else:
        if record is None and path.suffix != ".json" and not text.strip():
            return {}  # an empty YAML file
        if isinstance(record, dict):
            return record
        why = f"a {type(record).__name__}, not a mapping"
    raise ConfigError(f"{path} cannot be read ({why}); restore it from a copy, or move its run away")
