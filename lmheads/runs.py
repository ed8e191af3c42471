"""Run folders as records: one run per folder, evaluations filed with their run, nothing left behind by a
start that fails (the summary at the end of training is :mod:`lmheads.summary`'s).

A run folder is ``<save_dir>/<name>/<version>`` (the TensorBoard or CSV logger's, :mod:`lmheads.loggers`;
without a logger, a fit's ``trainer.default_root_dir``): ``config.yaml``, ``hparams.yaml``, event files
(or ``metrics.csv``), ``checkpoints/`` and, once training ends, ``results.json`` (``diverged.json`` if its
loss became NaN or infinite). ``validate``, ``test`` and ``predict`` of a checkpoint inside a run write
to ``<run>/<subcommand>/<checkpoint name>/``, with ``checkpoint.json`` (the checkpoint, the step it was
saved at, and data options other than the run's).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
import warnings
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only

from lmheads.errors import ConfigError
from lmheads.resume import REQUEUE_CHECKPOINTS

RESULTS_FILE = "results.json"
#: Written when the training loss became NaN or infinite: the step, and the message the run ended with.
DIVERGED_FILE = "diverged.json"
#: In an evaluation's folder: the checkpoint it read, the step that checkpoint was saved at (the
#: evaluation's metrics are logged at step 0) and its data options other than the run's.
EVALUATED_FILE = "checkpoint.json"


def run_of_checkpoint(ckpt: str | Path) -> Path | None:
    """The run folder a checkpoint file belongs to (``<run>/checkpoints/x.ckpt``, or a SLURM requeue
    checkpoint ``<run>/hpc_ckpt_N.ckpt``), or ``None``."""
    path = Path(ckpt)  # as given: the run's checkpoint callback then sees its folder under the same name
    if len(path.parts) < 4:  # <name>/<version>/checkpoints/<file> at least
        path = path.resolve()
    if path.match(REQUEUE_CHECKPOINTS):
        run = path.parent
    elif path.parent.name == "checkpoints":
        run = path.parent.parent
    else:
        return None
    recorded = any((run / f).is_file() for f in ("hparams.yaml", "config.yaml"))
    return run if recorded else None


#: Created exclusively when a run claims its folder: a second run with the same folder is refused, even
#: when both start at the same moment.
CLAIM_FILE = ".lmheads-run"


#: Locked by the process that writes into a run folder, for as long as its command runs: a POSIX lock
#: (``lockf``), which the operating system releases when that process ends, however it ends, and which
#: NFS extends to every host that mounts the folder. A file system without working locks cannot tell a
#: live claimant from a dead one: lmheads then warns and goes on with the claim file alone.
LOCK_FILE = ".lmheads-lock"
_HELD: dict[Path, int] = {}  # lock files this process holds -> their descriptors


def _lock(folder: Path) -> bool:
    """Lock ``folder``'s lock file for this process (held until :func:`_unlock`); ``False`` if another
    process holds it."""
    key = folder.resolve()
    if key in _HELD:
        return True
    fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):  # EAGAIN / EACCES: held by another process
        os.close(fd)
        return False
    except OSError as err:  # no locks on this file system
        warnings.warn(
            f"{folder}: the file system does not lock files ({err}); lmheads cannot tell whether "
            "another process writes into this run",
            stacklevel=2,
        )
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
    fd = os.open(key / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return True
    except OSError:  # no locks on this file system: nobody is known to hold it
        return False
    finally:
        os.close(fd)  # releases the probe's lock (this process holds no other on that file)
    return False


#: What a run writes into its folder (besides event files).
RUN_FILES = {CLAIM_FILE, LOCK_FILE, "config.yaml", "hparams.yaml", "checkpoints", RESULTS_FILE, DIVERGED_FILE}


def naming_option(shared: bool) -> str:
    """The option that gives a run another folder: its version, or without a logger the root folder."""
    return "--trainer.default_root_dir" if shared else "--trainer.logger.init_args.version"


class RunFolder:
    """The folder of one run (or one evaluation), claimed before anything is written to it.

    A folder that holds a run already is refused, unless ``resume`` (a fit continuing a checkpoint of
    that same folder); a folder holding other files (a sweep's log) is fine. The process that writes
    into the folder holds its lock (:data:`LOCK_FILE`) until the command ends, and its claim file names
    it, so a run is continued by one process at a time, on any host that shares the folder.
    :meth:`release` removes what this process added when the command failed before its first training
    step, so a failed start leaves nothing behind. Only the process of global rank 0 creates or removes
    anything. A ``shared`` folder is a fit's ``trainer.default_root_dir`` without a logger: it may hold
    other runs' folders and files, and a failed start removes only its own run files from it.
    """

    def __init__(self, path: Path, resume: bool = False, shared: bool = False) -> None:
        self.path = path
        self.resume = resume
        self.shared = shared
        self.trainer: L.Trainer | None = None
        self._before: set[str] | None = None  # the folder's entries when claimed; None: not claimed
        self._claimed = False
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
            self._write_claim("w")
            return
        existed = self.path.is_dir()
        self._top = next((p for p in reversed([self.path, *self.path.parents]) if not p.exists()), None)
        self.path.mkdir(parents=True, exist_ok=True)
        before = set(os.listdir(self.path))
        try:
            if before & RUN_FILES or any(name.startswith("events.out.tfevents") for name in before):
                raise FileExistsError  # a run from before claims were recorded
            self._write_claim("x")
        except FileExistsError:
            raise ConfigError(self._taken()) from None
        self._before = before if existed else set()
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
        """``x``: only if no claim exists (two runs that start at the same moment: one gets it)."""
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        claim = {"pid": os.getpid(), "host": socket.gethostname(), "started": started, "at": time.time()}
        with open(self.path / CLAIM_FILE, mode) as file:
            json.dump(claim, file)
        self._claimed = True

    def ended(self) -> None:
        """The command is over: its claim and lock no longer hold the folder (a process that stays, such
        as a notebook's, does not keep it from being continued elsewhere)."""
        if not self._claimed or rank_zero_only.rank != 0:
            return
        claim = self._claim() if self.path.is_dir() else None
        if claim is not None and claim["pid"] == os.getpid():
            (self.path / CLAIM_FILE).write_text(json.dumps({**claim, "ended": time.time()}))
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
        other = f"give this one another {naming_option(self.shared)}"
        holds_a_run = (
            f"run folder {self.path} already holds a run; {other}, or continue that run with "
            f"--ckpt_path={self.path / 'checkpoints' / 'last.ckpt'}"
        )
        if self.holder() is not None:
            return f"run folder {self.path} is in use by {self._holder_named()}: {other}"
        if (self.path / RESULTS_FILE).exists() or self._has_checkpoint():
            return holds_a_run
        claim = self._claim()
        if claim is None:
            return holds_a_run
        return (
            f"run folder {self.path} was claimed by process {claim['pid']} on {claim['host']} at "
            f"{claim['started']}, which stopped before its first checkpoint: {other}, or delete that folder "
            "to start it again"
        )

    def _has_checkpoint(self) -> bool:
        """Whether the run has saved a checkpoint (in a shared folder: in its ``checkpoints/``, or a SLURM
        requeue checkpoint beside it since the claim; not one in another run's folder there)."""
        if not self.shared:
            return any(self.path.rglob("*.ckpt"))
        requeue = (p for p in self.path.glob(REQUEUE_CHECKPOINTS) if p.name not in (self._before or set()))
        return any((self.path / "checkpoints").glob("*.ckpt")) or any(requeue)

    def release(self) -> None:
        """After a failure before the first training step (and before any checkpoint), or a
        ``fast_dev_run``: remove what this process added to the folder, and the folder if it created it;
        a run it was to continue gets its claim back as it was."""
        trainer = self.trainer
        trained = trainer is not None and trainer.global_step > 0 and not trainer.fast_dev_run
        if self.resume and self._claimed and not trained and rank_zero_only.rank == 0:  # the run as it was
            for source, target in reversed(self._set_aside):
                target.replace(source)
            self._set_aside = []
            claim = self.path / CLAIM_FILE
            claim.write_text(self._previous_claim) if self._previous_claim is not None else claim.unlink()
            self._claimed = False
        if self._before is None or trained or self._has_checkpoint() or rank_zero_only.rank != 0:
            return
        added = set(os.listdir(self.path)) - self._before
        for entry in added & RUN_FILES if self.shared else added:  # others may write beside a shared run
            target = self.path / entry
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        if self._created:  # and the parents it made (runs/<name>), as far as they are empty
            for folder in [self.path, *self.path.parents]:
                if any(folder.iterdir()):
                    break
                folder.rmdir()
                if folder == self._top:
                    break
        self._before = None


def record_evaluation(folder: Path, ckpt: str | Path, step: int, other_data: list[str]) -> None:
    """Write ``checkpoint.json`` into an evaluation's folder: the checkpoint it reads, the step that
    checkpoint was saved at (evaluations log at step 0), and how its data differs from the run's, if it
    does. ``compare.py`` then takes no test of an earlier ``last.ckpt`` or of other data for the run's."""
    if rank_zero_only.rank != 0:
        return
    record = {"checkpoint": str(Path(ckpt).resolve()), "step": step, "other_data": other_data}
    (folder / EVALUATED_FILE).write_text(json.dumps(record, indent=2) + "\n")


def free_name(folder: Path, base: str, suffix: str = "") -> str:
    """``base + suffix``, or ``base-2 + suffix``, ``base-3 + suffix``, ...: the first not in ``folder``."""
    name, n = base + suffix, 2
    while (folder / name).exists():
        name, n = f"{base}-{n}{suffix}", n + 1
    return name


def evaluation_folder(run: Path, subcommand: str, ckpt: Path) -> str:
    """``<subcommand>/<checkpoint name>`` inside the run, numbered when that evaluation exists already."""
    return free_name(run, f"{subcommand}/{ckpt.stem}")


def refuse_earlier_samples(folder: Path) -> None:
    """``predict`` without a logger writes its samples into ``trainer.default_root_dir``; an earlier
    predict's there would get this one's appended to them. Every process checks (none writes samples
    before all of them have started), so none is left waiting for one that stopped."""
    earlier = sorted(folder.glob("samples-rank*.jsonl"))
    if earlier:
        raise ConfigError(
            f"{folder} holds {earlier[0].name}, samples of an earlier predict: give this one another "
            "--trainer.default_root_dir, or keep the logger (each predict of a run's checkpoint then gets a "
            "folder of its own in that run)"
        )


def refuse_requeue_checkpoint(folder: Path, subcommand: str) -> None:
    """On SLURM, Lightning starts a command without a checkpoint from the newest requeue checkpoint in
    ``default_root_dir``, whichever run saved it. With a run folder that is the run's own folder; without
    one (another logger, or none) the command is refused while such a file lies there."""
    leftover = sorted(folder.glob(REQUEUE_CHECKPOINTS))
    if leftover and SLURMEnvironment.detect():
        raise ConfigError(
            f"{folder} holds {leftover[-1].name}, a SLURM requeue checkpoint: on SLURM Lightning would "
            f"{subcommand} from it, not from what this command says. Give it as --ckpt_path to continue "
            "from it, or move it out of trainer.default_root_dir"
        )
