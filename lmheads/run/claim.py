"""The claim on a run folder: one writer at a time, on any host, and nothing left by a start that fails.

The process that writes into a run folder holds an OS lock on its ``.lmheads-lock`` (``lockf``) for as
long as its command runs; the operating system releases it when that process ends, however it ends, and
NFS extends it to every host that mounts the folder. ``.lmheads-run`` names the holder (process, host,
start time). A file system without working locks cannot tell a live claimant from a dead one: lmheads
then warns and goes on with the claim file alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from lmheads.errors import ConfigError, make_folder, mend
from lmheads.files import write_whole
from lmheads.run.layout import DIVERGED_FILE, RESULTS_FILE, furthest_checkpoint

#: Created exclusively when a run claims its folder: a second run with the same folder is refused, even
#: when both start at the same moment.
CLAIM_FILE = ".lmheads-run"
#: Locked (``lockf``) by the process that writes into a run folder, for as long as its command runs.
LOCK_FILE = ".lmheads-lock"
_HELD: dict[Path, int] = {}  # lock files this process holds -> their descriptors
#: What a run writes into its folder (besides the loggers' files).
RUN_FILES = {CLAIM_FILE, LOCK_FILE, "config.yaml", "hparams.yaml", "checkpoints", RESULTS_FILE, DIVERGED_FILE}


def _try_lock(fd: int, folder: Path) -> bool | None:
    """Lock the open lock file ``fd``: ``True``, ``False`` if another process holds it, ``None`` where
    the file system has no locks (with a warning)."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except (BlockingIOError, PermissionError):  # EAGAIN / EACCES: held by another process
        return False
    except OSError as err:
        warnings.warn(
            f"{folder}: the file system does not lock files ({err}); lmheads cannot tell whether "
            "another process writes into this run",
            stacklevel=3,
        )
        return None


def _lock(folder: Path) -> bool:
    """Lock ``folder``'s lock file for this process (held until :func:`_unlock`); ``False`` if another
    process holds it."""
    key = folder.resolve()
    if key in _HELD:
        return True
    try:
        fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:  # a read-only file system, say
        raise ConfigError(_cannot_write(folder, err)) from None
    if _try_lock(fd, folder) is False:
        os.close(fd)
        return False
    _HELD[key] = fd
    return True


def _unlock(folder: Path) -> None:
    fd = _HELD.pop(folder.resolve(), None)
    if fd is not None:
        os.close(fd)  # and with it the lock


def _locked_elsewhere(folder: Path) -> bool:
    """Whether another process holds ``folder``'s lock now (a probe: this process holds none after it)."""
    key = folder.resolve()
    if key in _HELD or not (key / LOCK_FILE).is_file():
        return False
    try:
        fd = os.open(key / LOCK_FILE, os.O_RDWR)
    except OSError:  # a read-only file system: no process writes there
        return False
    try:
        return _try_lock(fd, folder) is False
    finally:
        os.close(fd)  # releases the probe's lock (this process holds no other on that file)


def _cannot_write(folder: Path, err: OSError) -> str:
    """Why the command cannot write into ``folder``, and what to do: free space, or make it writable."""
    return (
        f"{folder} cannot be written ({err.strerror or err}); {mend(err)}, or give the command another folder"
    )


#: The option that gives a run another folder.
NAMING_OPTION = "--trainer.logger.init_args.version"


class RunFolder:
    """The folder of one run (or one evaluation), claimed before anything is written to it.

    A folder that holds a run already is refused, unless ``resume`` (a fit continuing a checkpoint of
    that same folder); a folder holding other files (a sweep's log) is fine. The process that writes
    into the folder holds its lock (:data:`LOCK_FILE`) until the command ends, and its claim file names
    it, so a run is continued by one process at a time, on any host that shares the folder.
    :meth:`release` removes what this process added when the command failed before its first training
    step, so a failed start leaves nothing behind. Only the process of global rank 0 creates or removes
    anything.
    """

    def __init__(self, path: Path, resume: bool = False, start_step: int = 0) -> None:
        self.path = path
        self.resume = resume
        self.start_step = start_step  # the step of the checkpoint the command starts from
        self.trainer: L.Trainer | None = None
        self._before: set[str] | None = None  # the paths in the folder when claimed; None: not claimed
        self._claimed = False
        self._created = False  # whether it made the folder
        self._top: Path | None = None  # the first of the folder and its parents that it made
        self._previous_claim: str | None = None
        self._set_aside: list[tuple[Path, Path]] = []  # (file, where it went), put back if the start fails

    def claim(self) -> None:
        if rank_zero_only.rank != 0:
            return
        if self.resume:
            if not _lock(self.path):  # two resumes at one moment: one gets the lock
                raise ConfigError(
                    f"run folder {self.path} is in use by {self._holder_named()}, which trains that run: "
                    "continuing it at the same time would mix the two. Wait for it to end"
                )
            claim = self.path / CLAIM_FILE
            self._previous_claim = claim.read_text() if claim.is_file() else None  # back if it fails
            self._before = _paths(self.path)
            try:
                self._write_claim("w")
            except ConfigError:
                _unlock(self.path)
                raise
            return
        existed = self.path.is_dir()
        self._top = next((p for p in reversed([self.path, *self.path.parents]) if not p.exists()), None)
        try:
            make_folder(self.path, "give another trainer.logger.init_args.save_dir (or default_root_dir)")
        except ConfigError:
            self._remove_made_folders()  # the parents made before the one that failed
            raise
        before = set(os.listdir(self.path))
        try:
            if before & RUN_FILES or any(name.startswith("events.out.tfevents") for name in before):
                raise FileExistsError  # a run from before claims were recorded
            self._write_claim("x")
        except FileExistsError:
            raise ConfigError(self._taken()) from None
        except ConfigError:
            self._remove_made_folders()
            raise
        self._before = _paths(self.path) if existed else set()
        self._created = not existed
        _lock(self.path)  # its claim file was this process's to create: no other holds the folder

    def set_aside(self, name: str, new_name: str) -> bool:
        """Rename the run's file ``name`` (after :meth:`claim`, on a resume), so that what this command
        writes under that name does not replace it; :meth:`release` puts it back. Whether it was there."""
        source, target = self.path / name, self.path / new_name
        if rank_zero_only.rank != 0 or not source.is_file() or target.exists():
            return False
        source.rename(target)
        self._set_aside.append((source, target))
        return True

    def _write_claim(self, mode: str) -> None:
        """``x``: only if no claim exists (two runs that start at the same moment: one gets it); ``w``:
        in place of the one there, which a write that fails (a full disk) leaves as it was."""
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        claim = {"pid": os.getpid(), "host": socket.gethostname(), "started": started, "at": time.time()}
        path, text = self.path / CLAIM_FILE, json.dumps(claim)
        try:
            if mode == "w":
                write_whole(path, lambda tmp: tmp.write_text(text))
            else:
                with open(path, "x") as file:  # FileExistsError: another process's claim
                    try:
                        file.write(text)
                        file.flush()
                    except OSError:
                        path.unlink()  # its own, cut short
                        raise
        except FileExistsError:
            raise
        except OSError as err:
            raise ConfigError(_cannot_write(self.path, err)) from None
        self._claimed = True

    def ended(self) -> None:
        """The command is over: its claim and lock no longer hold the folder (a process that stays, such
        as a notebook's, does not keep it from being continued elsewhere)."""
        if not self._claimed or rank_zero_only.rank != 0:
            return
        claim = self._claim() if self.path.is_dir() else None
        if claim is not None and claim["pid"] == os.getpid():
            ended = json.dumps({**claim, "ended": time.time()})
            with contextlib.suppress(OSError):  # a full disk: the claim as it was, which the lock outlives
                write_whole(self.path / CLAIM_FILE, lambda tmp: tmp.write_text(ended))
        _unlock(self.path)
        self._claimed = False

    def _claim(self) -> dict | None:
        """The folder's claim, if it has a readable one (runs from before claims were recorded have none)."""
        try:
            claim = json.loads((self.path / CLAIM_FILE).read_text())
            claim["pid"] = int(claim["pid"])
            return claim if {"host", "started"} <= claim.keys() else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def holder(self) -> tuple[int, str, str] | None:
        """The process, host and start time of the claim, if another process holds the folder now (its
        lock; on any host that shares the file system)."""
        if not _locked_elsewhere(self.path):
            return None
        claim = self._claim() or {"pid": "?", "host": "?", "started": "?"}
        return claim["pid"], claim["host"], claim["started"]

    def _holder_named(self) -> str:
        pid, host, started = self.holder() or ("?", "?", "?")
        return f"process {pid} on {host} (started {started})"

    def _taken(self) -> str:
        """Why the folder cannot be claimed, and what to do. A run with a checkpoint or results can be
        continued; one without either is running, or stopped before its first checkpoint (SIGKILL, a lost
        machine, a crash of a process that trained several runs), which its claim tells apart."""
        other = f"give this one another {NAMING_OPTION}"
        if self.holder() is not None:
            return f"run folder {self.path} is in use by {self._holder_named()}: {other}"
        claim = self._claim()
        if claim is not None and not (self.path / RESULTS_FILE).exists() and not self._has_checkpoint():
            return (
                f"run folder {self.path} was claimed by process {claim['pid']} on {claim['host']} at "
                f"{claim['started']}, which stopped before its first checkpoint: {other}, or delete that "
                "folder to start it again"
            )
        furthest = furthest_checkpoint(self.path)  # read only for a run that is there to continue
        return f"run folder {self.path} already holds a run; {other}" + (
            f", or continue that run with --ckpt_path={furthest[1]}"
            if furthest is not None
            else " (that run has no checkpoint to continue from)"
        )

    def _has_checkpoint(self) -> bool:
        return any(self.path.rglob("*.ckpt"))

    def release(self) -> None:
        """After a failure before the command's first training step (and before any checkpoint), or a
        ``fast_dev_run``: remove what this process added to the folder, and the folder if it created it;
        a run it was to continue is left as it was, its claim included."""
        trainer = self.trainer
        trained = trainer is not None and trainer.global_step > self.start_step and not trainer.fast_dev_run
        if self.resume and self._claimed and not trained and rank_zero_only.rank == 0:  # the run as it was
            for source, target in reversed(self._set_aside):
                target.replace(source)
            self._set_aside = []
            claim = self.path / CLAIM_FILE
            claim.write_text(self._previous_claim) if self._previous_claim is not None else claim.unlink()
            self._claimed = False
        if self._before is None or trained or rank_zero_only.rank != 0:
            return
        added = _paths(self.path) - self._before  # a resume's new event file and configuration too
        if any(path.endswith(".ckpt") for path in added):
            return
        for entry in added:
            if os.path.dirname(entry) not in added:  # the first of the paths it added, with what is in it
                target = self.path / entry
                shutil.rmtree(target) if target.is_dir() else target.unlink()
        if self._created:  # and the parents it made (runs/<name>)
            self._remove_made_folders()
        self._before = None

    def _remove_made_folders(self) -> None:
        """The run's folder and the parents :meth:`claim` made for it, as far as they are empty."""
        for folder in [self.path, *self.path.parents]:
            if folder.is_dir():
                if any(folder.iterdir()):
                    break
                folder.rmdir()
            if folder == self._top:
                break


def unwritten(err: OSError) -> str:
    """Why a command stopped at a file it could not write (:func:`lmheads.errors.failed_write`) where
    lmheads does not write it itself (a log, which TensorBoard's writer writes), and how to go on: the run
    continued from its furthest checkpoint (an earlier state), or started again; a command that failed
    before training (an evaluation, say) left nothing, and is run again."""
    file = Path(err.filename) if err.filename else None
    run = next((p for p in (file, *file.parents) if (p / CLAIM_FILE).is_file()), None) if file else None
    furthest = furthest_checkpoint(run) if run is not None and file.exists() else None
    if furthest is not None:
        then = f"continue the run with --ckpt_path={furthest[1]} (an earlier state)"
    elif run is not None and file.exists():
        then = f"start it again (it has no checkpoint): delete {run}, or give another {NAMING_OPTION}"
    else:  # its folder, removed as a failed start's
        then = "run it again"
    why, what = err.strerror or err, file or "a file"
    return f"{what} could not be written ({why}); the command stopped. {mend(err).capitalize()}, then {then}"


def _paths(folder: Path) -> set[str]:
    """Every file and folder under ``folder``, as paths relative to it."""
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}
