"""What a command prints: a progress bar over the whole run, output that survives a closed pipe, and no
notices a user cannot act on."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

#: Lightning messages (through its rank-zero logger) that advertise or describe its own internals.
QUIET_MESSAGES = (
    "💡 Tip:",  # advertisements for Lightning's cloud products
    "The following callbacks returned in `LightningModule.configure_callbacks` will override",
)


class _DropMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(QUIET_MESSAGES)


def quiet_lightning() -> None:
    """Drop Lightning's tips and notices about its internals, and a deprecation inside Lightning's own
    code (``LeafSpec``); messages a user can act on stay."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropMessages) for f in logger.filters):
        logger.addFilter(_DropMessages())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # Only a resumed run writes into a checkpoint folder that has files (lmheads.runs refuses others).
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


class ProgressBar(TQDMProgressBar):
    """One bar for the whole run when ``trainer.max_steps`` is set: optimizer steps out of ``max_steps``,
    starting where a resumed run stands, with an ETA for the rest (Lightning's bar counts the batches of
    the current epoch). No ``v_num``; the run folder is printed at the start and the end. On a GPU the
    bar refreshes every ``log_every_n_steps`` steps by default: each refresh reads the loss from the
    device, a host synchronisation.

    Args:
        refresh_rate: Refresh every this many steps (default: 1 on a CPU, ``log_every_n_steps`` on a GPU).
    """

    def __init__(self, refresh_rate: int | None = None) -> None:
        super().__init__(refresh_rate=1 if refresh_rate is None else refresh_rate)
        self._auto_refresh = refresh_rate is None

    @property
    def refresh_rate(self) -> int:
        trainer = getattr(self, "_trainer", None)
        if self._auto_refresh and trainer is not None and trainer.strategy.root_device.type == "cuda":
            return max(trainer.log_every_n_steps, 1)
        return super().refresh_rate

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def on_train_start(self, trainer: L.Trainer, *args) -> None:
        super().on_train_start(trainer, *args)
        if trainer.max_steps > 0:  # a resumed run may start mid-epoch, without on_train_epoch_start
            bar = self.train_progress_bar
            bar.reset(total=trainer.max_steps)
            bar.initial = bar.n = trainer.global_step  # the ETA counts this start's rate only
            bar.set_description(f"Epoch {trainer.current_epoch}")

    def on_train_epoch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.max_steps <= 0:  # no set length: Lightning's bar per epoch
            return super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.max_steps <= 0:
            return super().on_train_batch_end(trainer, pl_module, *args)
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is not None and not bar.disable and (step % self.refresh_rate == 0 or step == bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar


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
