"""The places lmheads reaches into Lightning (2.6) where it has no public way, kept in one file;
``tests/test_lightning_internals.py`` fails loudly when a Lightning release changes them."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback


def batches_done_this_epoch(trainer: L.Trainer) -> int:
    """Batches of the current epoch trained before a resume: where a resumable sampler starts again.
    (Lightning restores its loop progress before it asks for the loaders.)"""
    return trainer.fit_loop.epoch_loop.batch_progress.current.completed


def stop_after_this_step(trainer: L.Trainer) -> None:
    """Make Lightning stop after the current step as after SIGTERM: it then raises ``SIGTERMException``
    out of the loop, which the interruption callback turns into a checkpoint. (``trainer.should_stop``
    would end the fit normally, and not before ``min_steps``.)"""
    trainer._signal_connector.received_sigterm = True


def validate_and_stop_after_this_step(trainer: L.Trainer) -> None:
    """End ``fit`` after the current step with a validation of it, whatever ``val_check_interval`` says:
    Lightning validates a step at which ``trainer.should_stop`` is set (as for early stopping and
    ``max_time``). The checkpoints of that validation are taken in the epoch-end hooks when validation
    runs once an epoch (see :func:`resume_where_fit_ended`)."""
    trainer.should_stop = True


def resume_where_fit_ended(checkpoint: dict) -> None:
    """A checkpoint taken after ``fit`` ended (or was interrupted) between epochs' bookkeeping counts the
    epoch it was in as finished, whether or not its batches were: Lightning would resume into the next
    epoch with this one's batch count, and skip data. Make the counters say where training stood: after
    an epoch's last batch, the next epoch not begun; after ``max_steps`` part-way through one, that epoch
    still in progress (as a checkpoint taken at a mid-epoch validation says)."""
    loop = checkpoint.get("loops", {}).get("fit_loop")
    if not loop:
        return
    epochs, batches = loop["epoch_progress"], loop["epoch_loop.batch_progress"]
    total = epochs["total"]
    if not batches["current"]["completed"] or not total["ready"] == total["started"] == total["processed"]:
        return
    if total["completed"] == total["processed"] - 1:
        # taken in the epoch-end hooks (ModelCheckpoint there): Lightning would resume with the sampler
        # one epoch ahead of the epoch counter. After the epoch's last batch it is done but for its
        # bookkeeping; stopped before it (trainer.should_stop: the run's last step, max_time), it is still
        # in progress, and Lightning would skip its remaining batches
        done = batches["is_last_batch"]
        for progress in (epochs["total"], epochs["current"]):
            if done:
                progress["completed"] += 1
            else:
                progress["processed"] -= 1
        if not done:
            return
    if total["completed"] != total["processed"]:
        return
    if batches["is_last_batch"]:
        batches["current"] = dict.fromkeys(batches["current"], 0)
        batches["is_last_batch"] = False
    else:
        for progress in (epochs["total"], epochs["current"]):
            progress["processed"] -= 1
            progress["completed"] -= 1


def align_logging_step(trainer: L.Trainer) -> None:
    """Keep the step the loggers use equal to the optimizer step. Lightning's count of stepped batches
    is one off after some resumes (it adds one on a restart it believes came after a batch, or does not
    where it did, as when the validation interval changed), and every value after it would be logged at
    the wrong step."""
    loop = trainer.fit_loop.epoch_loop
    if loop._batches_that_stepped != trainer.global_step:
        loop._batches_that_stepped = trainer.global_step


class AlignLoggingStep(Callback):
    """:func:`align_logging_step` at the start of each training batch, put before the other callbacks
    (``LearningRateMonitor`` logs there, before the module's own hook)."""

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        align_logging_step(trainer)


def keeps_the_highest(state_key: str) -> bool:
    """Whether the ``ModelCheckpoint`` whose state a checkpoint keeps under ``state_key`` keeps its
    checkpoints by the highest value of its metric (``mode: max``): its state does not say, its key (the
    class name and a repr of its settings) does."""
    return "'mode': 'max'" in state_key


def sharded_checkpoints(strategy) -> str | None:
    """The option that makes ``strategy`` write each checkpoint as one file, where it would write a folder
    of shards instead: ``ModelParallelStrategy`` does by default, ``FSDPStrategy`` with sharded state
    dicts."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    if isinstance(strategy, ModelParallelStrategy) and strategy._save_distributed_checkpoint:
        return "save_distributed_checkpoint=false"
    if isinstance(strategy, FSDPStrategy) and strategy._state_dict_type == "sharded":
        return "state_dict_type=full"
    return None


def requeue_signal(trainer: L.Trainer) -> int | None:
    """The signal on which Lightning's SLURM auto-requeue saves a checkpoint and requeues the job (``None``
    where it is off). Its handler, installed when ``fit`` starts, saves wherever the signal lands: inside
    a step, which a resume would take again from other random numbers or half done."""
    environment = trainer._accelerator_connector.cluster_environment
    if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
        return int(environment.requeue_signal)
    return None


def quiet_wandb(logger) -> None:
    """Leave W&B's ``anonymous`` setting out of the ``wandb.init`` a ``WandbLogger`` will call where it is
    unset: the logger passes ``anonymous=None``, on which W&B (0.19 and later) warns in every run that
    the setting has no effect."""
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and "anonymous" in init and init["anonymous"] is None:
        del init["anonymous"]
