"""The records a command leaves in its folder: at the end of training the summary (printed, and written as
``results.json``, or ``diverged.json`` for a run whose loss became NaN or infinite), and for an
evaluation of a run's checkpoint ``checkpoint.json``; the reports read them back."""

from __future__ import annotations

import math
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_only

from lmheads.checkpointing import lowest_loss_checkpoint
from lmheads.errors import CheckpointWriteError, ConfigError, NonFiniteLossError, failed_write
from lmheads.files import read_record, write_json
from lmheads.heads import head_name
from lmheads.reporting import tokens_per_step
from lmheads.run.layout import DIVERGED_FILE, EVALUATED_FILE, RESULTS_FILE


def _run_dir(trainer: L.Trainer) -> str | None:
    """The run's folder, which the CLI makes the trainer's ``default_root_dir``; ``None`` in a dry run
    (``fast_dev_run``), which records nothing."""
    return None if trainer.fast_dev_run else trainer.default_root_dir


class RunConfig(SaveConfigCallback):
    """The command's configuration, saved into its folder (the trainer's ``default_root_dir``, which the
    CLI makes the run's) whichever logger comes first, or none; the CLI names the file."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        path = Path(trainer.default_root_dir) / self.config_filename
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.parser.save(
                self.config, str(path), skip_none=False, overwrite=self.overwrite, multifile=self.multifile
            )
        except OSError as err:  # before training: the failed start leaves no folder
            raise ConfigError(
                f"{path} could not be written ({err.strerror or err}); free space there, or give another "
                "trainer.logger.init_args.save_dir (or default_root_dir)"
            ) from err


class RunSummary(L.Callback):
    """At the end of ``fit``: prints the run folder, the best and last checkpoints, the last validation
    metrics, tokens seen and wall-clock, and writes the same to ``<run>/results.json``. A run whose loss
    became NaN or infinite records the step in ``<run>/diverged.json`` instead, so that a comparison does
    not take it for a run stopped early."""

    def __init__(self) -> None:
        self._start = 0.0
        self._validated_at: int | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._validated_at = time.perf_counter(), None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated_at = trainer.global_step

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        folder = _run_dir(trainer)
        if isinstance(exception, NonFiniteLossError) and trainer.is_global_zero and folder is not None:
            record = {"step": exception.step, "message": str(exception)}
            write_json(Path(folder, DIVERGED_FILE), record)
        if (full := failed_write(exception)) is not None and full.filename is None and folder is not None:
            full.filename = str(folder)  # a writer thread's error names no file: one in the run's folder

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = _run_dir(trainer)
        if not trainer.is_global_zero or folder is None:
            return
        Path(folder, DIVERGED_FILE).unlink(missing_ok=True)  # this session trained to its end
        checkpoint = trainer.checkpoint_callback
        metrics = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith("val/") and torch.is_tensor(v) and v.numel() == 1
        }
        validated_at = self._validated_at
        if validated_at is None:  # continued without a validation: keep the last one's, if any
            recorded = read_record(Path(folder, RESULTS_FILE))
            metrics, validated_at = recorded.get("metrics", metrics), recorded.get("validated_at")
        results = {
            "run": str(Path(folder).resolve()),
            "head": head_name(pl_module.head),
            "step": trainer.global_step,
            "tokens_seen": trainer.global_step * tokens_per_step(pl_module, trainer),
            "wall_clock_s": round(time.perf_counter() - self._start, 1),
            "best_checkpoint": lowest_loss_checkpoint(
                (c.state_key, c.state_dict()) for c in trainer.checkpoint_callbacks
            ),
            "last_checkpoint": getattr(checkpoint, "last_model_path", "") or None,
            "validated_at": validated_at,  # the step of the metrics
            "metrics": {k: v for k, v in sorted(metrics.items()) if math.isfinite(v)},
            "stopped_early": stopped_early(trainer),
        }
        shown = [k for k in ("val/loss", "val/ppl", "val/bpb", "val/excess_loss") if k in results["metrics"]]
        lines = [
            f"run: {results['run']}",
            f"  head {results['head']}, {results['step']} steps, {results['tokens_seen']:,} tokens, "
            f"{results['wall_clock_s']:.0f} s",
            *(f"  {k} {results['metrics'][k]:.4f}" for k in shown),
            *(
                [f"  (of step {validated_at}, the last validation)"]
                if self._stale(trainer, shown, validated_at)
                else []
            ),
            *([f"  stopped early: {results['stopped_early']}"] if results["stopped_early"] else []),
            f"  best checkpoint: {results['best_checkpoint'] or 'none'}",
            f"  last checkpoint: {results['last_checkpoint'] or 'none'}",
        ]
        print("\n".join(lines), flush=True)
        path = Path(folder, RESULTS_FILE)
        try:
            write_json(path, results)
        except OSError as err:
            raise CheckpointWriteError(
                f"{path} could not be written ({err.strerror or err}); training ended at step "
                f"{results['step']} and its checkpoints are whole (the reports read the run from its logs "
                "without it). Free space there"
            ) from err

    @staticmethod
    def _stale(trainer: L.Trainer, shown: list[str], validated_at: int | None) -> bool:
        """Whether the metrics shown are of an earlier step than the run's last (validation every n
        epochs, where the last epoch is not one of them; a continuation that trained nothing)."""
        return bool(shown) and validated_at is not None and validated_at != trainer.global_step


def stopped_early(trainer: L.Trainer) -> str | None:
    """Why ``fit`` ended before ``max_steps`` (or, without them, ``max_epochs``) where a callback ended it:
    early stopping (its reason) or ``max_time``; ``None`` for a run that trained what it asked for."""
    if trainer.max_steps > 0:
        short = 0 < trainer.global_step < trainer.max_steps
    else:  # the epoch counter has moved past every epoch finished
        short = trainer.max_epochs is not None and trainer.current_epoch < trainer.max_epochs
    if not short:
        return None
    for callback in trainer.early_stopping_callbacks:
        if callback.stopping_reason_message:
            return callback.stopping_reason_message.removesuffix(" Signaling Trainer to stop.")
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    remaining = timer.time_remaining() if timer is not None else None
    return "max_time reached" if remaining is not None and remaining <= 0 else None


def filed_line(command: str, folder: Path, other_data: list[str]) -> str:
    """What an evaluation prints at its end: where it is filed, and whether it is of the run's data and
    settings."""
    line = f"{command}: filed in {folder}"
    if other_data:
        line += f", on data or settings other than the run's ({'; '.join(other_data)}): "
        line += "compare.py does not take it for the run's own"
    return line


def record_evaluation(folder: Path, ckpt: str | Path, step: int, other_data: list[str]) -> None:
    """Write ``checkpoint.json`` into an evaluation's folder: the checkpoint it reads, the step that
    checkpoint was saved at (evaluations log at step 0), and how its data differs from the run's, if it
    does. ``compare.py`` then takes no test of an earlier ``last.ckpt`` or of other data for the run's."""
    if rank_zero_only.rank != 0:
        return
    record = {"checkpoint": str(Path(ckpt).resolve()), "step": step, "other_data": other_data}
    try:
        write_json(folder / EVALUATED_FILE, record)
    except OSError as err:
        raise ConfigError(
            f"{folder / EVALUATED_FILE} could not be written ({err.strerror or err}); free space there"
        ) from err
