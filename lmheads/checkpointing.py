"""Checkpoints: whether one fits a model, the random state that makes a resumed run exact, a checkpoint
written when training is interrupted, and none of a diverged model."""

from __future__ import annotations

import errno
import os
import random
import signal
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lmheads.errors import CheckpointWriteError, ConfigError, Interrupted, NonFiniteLossError, causes
from lmheads.files import remove
from lmheads.heads import head_name
from lmheads.lightning_internals import keeps_the_highest, requeue_signal, stop_after_this_step

#: Where lmheads keeps the random state in a checkpoint (tensors and plain types: weights_only loads it).
RNG_KEY = "lmheads_rng"
#: The training-frequency bucket of each token id (lmheads.metrics.FREQUENCY_BUCKETS), int8 (V,).
TOKEN_BUCKET_KEY = "lmheads_token_bucket"


def read_checkpoint(path: str | None, given_as: str = "--ckpt_path") -> dict | None:
    """The checkpoint at ``path``, memory-mapped, or a one-line error when it is missing or unreadable,
    before Lightning opens it (``None`` for no path or Lightning's ``last``/``best``/... keywords).
    ``given_as`` names where the user gave the path, for the error."""
    if path is None or path in ("last", "best", "hpc", "registry"):
        return None
    if Path(path).is_dir():
        last = Path(path, "checkpoints", "last.ckpt")
        example = f" (this run's last: {last})" if last.is_file() else ""
        raise ConfigError(f"checkpoint {path!r} is a folder; give a checkpoint file in {given_as}{example}")
    if not Path(path).is_file():
        raise ConfigError(f"checkpoint {path!r} does not exist; check {given_as}")
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:
        reason = f"{type(err).__name__}: {err}"
        raise ConfigError(
            f"checkpoint {path!r} cannot be read ({reason}); it is corrupt or not a checkpoint"
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"{path!r} is not a Lightning checkpoint (no state_dict in it)")
    return checkpoint


def check_compatible(model: torch.nn.Module, state: dict) -> None:
    """A clear message instead of a size-mismatch traceback when a checkpoint's state dict belongs to
    another model: the CLI calls it before training starts, and the module when a checkpoint loads."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state.items()}
    problems = []
    if own.get("backbone.wte.weight") != theirs.get("backbone.wte.weight"):
        problems.append(
            f"token embedding {theirs.get('backbone.wte.weight')} in the checkpoint, "
            f"{own.get('backbone.wte.weight')} here (another vocabulary or embedding width?)"
        )
    missing = sorted(k for k in own if k not in theirs)
    unexpected = sorted(k for k in theirs if k not in own)
    if missing or unexpected:
        problems.append(
            f"parameters missing from the checkpoint: {missing or 'none'}; not in this model: "
            f"{unexpected or 'none'} (another head or backbone?)"
        )
    shapes = sorted(k for k in own.keys() & theirs.keys() if own[k] != theirs[k] and "wte" not in k)
    if shapes:
        problems.append(f"shapes differ for {shapes}")
    if problems:
        raise ConfigError(
            f"the checkpoint does not fit this model (head {head_name(model.head)!r}): " + "; ".join(problems)
        )


def rng_state() -> dict:
    """The random state of torch (CPU and this process's GPU), numpy and Python.

    Every process of a run is seeded alike and draws alike (dropout on batches of one shape; samples
    and data order have generators of their own), so the state of rank 0, which writes the checkpoint,
    continues every process, each on its own device. The states of the other visible devices are not
    the ones their processes drew from: in rank 0's process those devices were never used."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else None,
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


def restore_rng_state(state: dict) -> None:
    """Continue the random streams of :func:`rng_state` exactly."""
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if torch.cuda.is_available() and cuda is not None and len(cuda):
        device = torch.cuda.current_device()  # this process's (Lightning sets it before a checkpoint loads)
        if isinstance(cuda, list):  # an older checkpoint's state of every visible device: the same one's
            cuda = cuda[device] if device < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


class FiniteLoss(L.Callback):
    """Stops training at the first NaN or infinite training loss, and never lets a checkpoint of that
    state be written. The step is remembered on the device (no host synchronisation in a step) and
    checked after every step on CPU, at the logging interval on GPU, and before every checkpoint."""

    def __init__(self) -> None:
        self._first: torch.Tensor | None = None  # the first non-finite step, -1 while there is none

    def on_before_backward(self, trainer: L.Trainer, pl_module, loss: torch.Tensor) -> None:
        if self._first is None or self._first.device != loss.device:
            self._first = torch.tensor(-1, device=loss.device)
        bad = ~torch.isfinite(loss.detach()) & (self._first < 0)
        self._first = torch.where(bad, trainer.global_step, self._first)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, *args) -> None:
        if pl_module.device.type != "cuda" or trainer.global_step % trainer.log_every_n_steps == 0:
            self.check(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        self.check(trainer)

    def check(self, trainer: L.Trainer) -> None:
        step = -1 if self._first is None else int(self._first)
        if step < 0:
            return
        last = getattr(trainer.checkpoint_callback, "last_model_path", "") or None  # the last validation's
        good = f"the last good state is {last}" if last else "no checkpoint was written before it"
        precision = str(trainer.precision)
        if precision == "16-true":
            fix = (
                "Train in 16-mixed or bf16-mixed: with 16-true the weights and AdamW's state are float16, "
                "too narrow for its squared gradients (they round to 0, and the update divides by them)"
            )
        else:
            mixed = "try bf16-mixed instead of 16-mixed, " if precision == "16-mixed" else ""
            fix = f"Lower model.lr, raise warmup_steps, {mixed}or set a head softcap or z_loss"
        raise NonFiniteLossError(
            f"the training loss became NaN or infinite at step {step}; training stopped and no "
            f"checkpoint of that state was written ({good}). {fix}",
            step,
        )


class InterruptCheckpoint(L.Callback):
    """Ctrl-C or SIGTERM during ``fit``: finish the current step (with gradient accumulation, its
    remaining batches too), save ``interrupted.ckpt`` beside the other checkpoints, and stop with exit
    status 130 (SIGINT) or 143 (SIGTERM).

    A signal only marks the process; after each training step the processes agree (a maximum over a
    small gloo all-reduce, which never waits for the GPU) and all stop at that same step, whichever of
    them received it: one rank (``kill`` of one process), all of them (Ctrl-C in a terminal, SLURM,
    torchrun), or several at slightly different times. A second Ctrl-C interrupts at once. The
    checkpoint is taken between steps, so resuming from it continues exactly where training stopped.
    The signal of Lightning's SLURM auto-requeue is held likewise: its handler, which saves
    ``hpc_ckpt_N.ckpt`` and requeues the job, runs at the end of the step, on every process at once.
    """

    def __init__(self) -> None:
        self._previous_handlers: dict[int, object] = {}
        self._group = None
        self.signal: int | None = None
        self._step_before_batch = 0
        self._installed: dict[int, object] = {}
        self._requeue: int | None = None  # the signal of Lightning's SLURM auto-requeue, if on
        self._requeue_asked = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Here rather than in on_fit_start: Lightning installs its own SIGTERM handler in between.
        if threading.current_thread() is not threading.main_thread():
            return
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")  # every rank creates it, in the same order

        pid = os.getpid()

        def on_signal(signum, frame) -> None:
            if os.getpid() != pid:  # a DataLoader worker forked from this process: this one stops it
                return
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            again = " (again to abort at once)" if signum == signal.SIGINT else ""
            rank_zero_info(f"\n{name}: stopping after this step and saving a checkpoint{again}")
            self.signal = self.signal or signum
            if signum == signal.SIGINT:
                signal.signal(signal.SIGINT, signal.default_int_handler)

        handlers = {signal.SIGINT: on_signal, signal.SIGTERM: on_signal}
        # Lightning's auto-requeue saves its checkpoint wherever its signal lands; it runs at a step's end
        self._requeue = requeue_signal(trainer)
        if self._requeue is not None and callable(signal.getsignal(self._requeue)):
            handlers[self._requeue] = lambda signum, frame: setattr(self, "_requeue_asked", True)
        for signum, handler in handlers.items():
            self._previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, handler)
        self._installed = handlers

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        self._step_before_batch = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        received, requeue = self.signal or 0, int(self._requeue_asked)
        if self._group is not None:
            flags = torch.tensor([received, requeue], dtype=torch.int32)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
            received, requeue = (int(f) for f in flags)
        self.signal = self.signal or received or None
        # a batch that only accumulated gradients is not a step's end: its gradients are in no checkpoint,
        # and the step resumed from one would be taken on the later batches alone
        if trainer.global_step == self._step_before_batch:
            self._requeue_asked = bool(requeue)
            return
        if requeue:  # every process at once: Lightning's handler saves (all of them) and requeues (rank 0)
            self._requeue_asked = False
            self._previous_handlers[self._requeue](self._requeue, None)
        if self.signal:
            stop_after_this_step(trainer)

    def _restore_handler(self) -> None:
        # only where this callback's handler is still there: at the end of a fit Lightning has already put
        # back the handlers it found, and those it replaced them with belong to a trainer that is done
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous_handlers.items():
                if signal.getsignal(signum) is self._installed.get(signum):
                    signal.signal(signum, handler)
        self._previous_handlers, self._installed = {}, {}
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handler()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handler()
        if not isinstance(exception, SIGTERMException):
            return
        checkpoint = trainer.checkpoint_callback
        folder = (
            Path(checkpoint.dirpath)
            if checkpoint is not None and checkpoint.dirpath
            else Path(trainer.default_root_dir)
        )
        path = folder / "interrupted.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # the whole state, to resume
        name, code = ("SIGINT", 130) if self.signal == signal.SIGINT else ("SIGTERM", 143)
        raise Interrupted(
            f"{name} at step {trainer.global_step}: saved {path}; resume with --ckpt_path={path}", code
        ) from exception


def check_filename(callback: ModelCheckpoint) -> None:
    """Refuse a checkpoint ``filename`` that would put files in subfolders of the run's ``checkpoints/``,
    where no lookup of a run's checkpoints (``--ckpt_path=last``, a sweep's resume) finds them: a ``/`` in
    it, or a metric of lmheads' (``val/loss``) whose name Lightning writes into the file's name."""
    example = Path(callback.format_checkpoint_name({}))  # each value as 0
    if example.parent == Path(callback.dirpath):
        return
    raise ConfigError(
        f"the ModelCheckpoint filename {callback.filename!r} would write checkpoints into subfolders of the "
        f"run's checkpoints/ ({example.relative_to(callback.dirpath)}), where they are not looked for: "
        "give a filename without '/' and, where it names a metric (lmheads' hold a '/'), "
        "auto_insert_metric_name=false, e.g. 'step{step}-loss{val/loss:.3f}'"
    )


def lowest_loss_checkpoint(states: Iterable[tuple[str, Any]]) -> str | None:
    """The checkpoint of the lowest validation loss among those that checkpoint callbacks keep by it,
    from their (state key, state) pairs (a checkpoint's ``callbacks``): a callback that monitors something
    else (or nothing: the newest checkpoint is its "best") or keeps the highest loss chooses none."""
    scores = {}
    for key, state in states:
        if isinstance(state, dict) and state.get("monitor") == "val/loss" and not keeps_the_highest(key):
            scores.update({path: float(score) for path, score in (state.get("best_k_models") or {}).items()})
    return min(scores, key=scores.__getitem__, default=None)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is the state of the run's last validation, and where ``fit``
    ended. Lightning's rewrites it only at a validation that saves a best checkpoint (and at the end only
    if it never wrote one): a run that overfits, diverges or is killed would leave a ``last.ckpt`` from
    its best validation, and continuing from it would lose, or train twice, every step since. Its defaults
    are the run's checkpoints: ``last.ckpt`` and ``step<N>.ckpt``, the best by validation loss; given in
    ``trainer.callbacks`` with ``save_top_k=3``, it keeps the three best beside ``last.ckpt``."""

    def __init__(
        self,
        dirpath: str | Path | None = None,
        filename: str | None = "step{step}",
        monitor: str | None = "val/loss",
        save_last: bool | None = True,
        auto_insert_metric_name: bool = False,
        enable_version_counter: bool = False,  # a resumed run updates its last.ckpt
        **kwargs,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            save_last=save_last,
            auto_insert_metric_name=auto_insert_metric_name,
            enable_version_counter=enable_version_counter,
            **kwargs,
        )
        self._written_at: int | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._written_at = trainer.global_step

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not trainer.sanity_checking and not trainer.fast_dev_run and trainer.state.fn == "fit":
            self._write_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run:  # a dry run writes no checkpoint (Lightning's would write last.ckpt)
            return
        super().on_train_end(trainer, pl_module)
        self._write_last(trainer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The checkpoints this run chose, named where the run lies now: a continued run's, also after
        its folder moved. A run started from another run's checkpoint keeps none of that run's (Lightning
        would keep its best checkpoint as this run's, with a warning)."""
        here, then = self.dirpath, state_dict.get("dirpath")
        if here is not None and then is not None and then != here:
            best = state_dict.get("best_model_path")
            if not best or not (Path(here) / Path(best).name).is_file():
                return  # another run's: this run's best is among its own validations

            def moved(path: str) -> str:
                return str(Path(here) / Path(path).name) if path else path

            paths = ("best_model_path", "kth_best_model_path", "last_model_path")
            state_dict = {
                **state_dict,
                **{key: moved(state_dict[key]) for key in paths if key in state_dict},
                "dirpath": here,
                "best_k_models": {moved(k): v for k, v in state_dict.get("best_k_models", {}).items()},
            }
        super().load_state_dict(state_dict)

    def _write_last(self, trainer: L.Trainer) -> None:
        """``last.ckpt`` at this step, unless a checkpoint of it was written already (Lightning's own
        ``last.ckpt`` among them) or this is a dry run (which writes none)."""
        if not self.save_last or self.dirpath is None or self._written_at == trainer.global_step:
            return
        path = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        trainer.save_checkpoint(path, weights_only=False)  # the whole state, to resume
        self.last_model_path = str(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files that are whole or absent. Lightning's writer stages the file in the temporary
    folder and moves it into place, which is a copy when that folder is on another file system (a tmpfs
    ``TMPDIR``): a process killed during the copy leaves a partial file under the checkpoint's name. This
    one writes ``.<name>.<pid>.partial`` beside the target, syncs it to disk, and renames it, which is
    atomic within one folder. A process killed mid-write leaves only that hidden ``.partial`` file, which
    no checkpoint lookup takes for a checkpoint. A write that fails (a full disk) removes it and stops
    training with :class:`CheckpointWriteError`, naming the checkpoint to continue from."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, target)
        except Exception as err:  # torch's writer raises a RuntimeError over the file's OSError
            failed = next((e for e in causes(err) if isinstance(e, OSError)), None)
            if failed is None:
                raise
            raise CheckpointWriteError(_unwritten(target, checkpoint.get("global_step"), failed)) from err
        finally:
            remove(partial)


def _unwritten(target: Path, step: int | None, err: OSError) -> str:
    """Why training stopped at a checkpoint it could not write, and how to continue: ``last.ckpt``, if
    there is one, is an earlier state, whole (this write never replaced it)."""
    fix = "Free space there" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "Make that folder writable"
    last = target.parent / "last.ckpt"
    run = target.parent.parent if target.parent.name == "checkpoints" else target.parent
    then = (
        f"then continue the run with --ckpt_path={last} (an earlier state)"
        if last.is_file()
        else f"then start it again (no checkpoint was written before): delete {run}, or give another "
        "--trainer.logger.init_args.version"
    )
    at = "" if step is None else f" at step {step}"
    why = err.strerror or err
    return f"checkpoint {target} could not be written ({why}); training stopped{at}. {fix}, {then}"


def atomic_checkpoints(trainer: L.Trainer) -> None:
    """Give the trainer :class:`AtomicCheckpointIO` where it would use Lightning's plain file writer (a
    plugin the user chose is kept)."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
