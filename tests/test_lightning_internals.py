"""Lightning internals that lmheads relies on (lmheads/lightning_internals.py): these fail loudly, with
the attribute that moved, when a Lightning release changes them."""

from __future__ import annotations

import signal

import lightning as L
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel

from lmheads.lightning_internals import (
    align_logging_step,
    batches_done_this_epoch,
    keeps_the_highest,
    quiet_wandb,
    requeue_signal,
    sharded_checkpoints,
    stop_after_this_step,
    validate_and_stop_after_this_step,
)

from .helpers import SLURM


def test_the_internals_exist_on_a_trainer():
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    assert batches_done_this_epoch(trainer) == 0
    trainer.fit_loop.epoch_loop._batches_that_stepped = 5
    align_logging_step(trainer)  # the loggers' step follows the optimizer step
    assert trainer.fit_loop.epoch_loop._batches_that_stepped == trainer.global_step == 0
    assert trainer._signal_connector.received_sigterm is False
    stop_after_this_step(trainer)
    assert trainer._signal_connector.received_sigterm is True


def test_a_checkpoint_callbacks_state_key_says_its_mode():
    from lightning.pytorch.callbacks import ModelCheckpoint

    for mode in ("min", "max"):
        callback = ModelCheckpoint(monitor="val/loss", mode=mode)
        assert keeps_the_highest(callback.state_key) is (mode == "max")
        assert "mode" not in callback.state_dict()  # else the state would say it


@pytest.mark.parametrize("asked", [False, True])
def test_a_step_asked_to_stop_at_is_validated(asked):
    """5 steps validated every 3 batches: step 3 only, and step 5 too when the last step asks to stop."""
    validated_at = []

    class Counted(BoringModel):
        def on_train_batch_end(self, outputs, batch, batch_idx):
            if asked and self.trainer.global_step == self.trainer.max_steps:
                validate_and_stop_after_this_step(self.trainer)

        def on_validation_end(self):
            if not self.trainer.sanity_checking:
                validated_at.append(self.trainer.global_step)

    trainer = L.Trainer(
        accelerator="cpu", max_steps=5, val_check_interval=3, limit_val_batches=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Counted())
    assert validated_at == ([3, 5] if asked else [3])


def test_the_signal_of_slurms_auto_requeue_has_lightnings_handler_when_training_starts(monkeypatch):
    quiet = {
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    assert requeue_signal(L.Trainer(**quiet)) is None
    for name, value in SLURM.items():
        monkeypatch.setenv(name, value)
    handled = []

    class Seen(BoringModel):
        def on_train_start(self):
            handled.append(callable(signal.getsignal(requeue_signal(self.trainer))))

    trainer = L.Trainer(**quiet, max_steps=1, limit_val_batches=0, enable_checkpointing=False)
    assert requeue_signal(trainer) == signal.SIGUSR1
    trainer.fit(Seen())
    assert handled == [True]


def test_the_strategies_say_when_they_write_folders_of_shards():
    from lightning.pytorch.strategies import ModelParallelStrategy

    assert sharded_checkpoints(ModelParallelStrategy()) == "save_distributed_checkpoint=false"  # the default
    assert sharded_checkpoints(ModelParallelStrategy(save_distributed_checkpoint=False)) is None


def test_the_wandb_logger_passes_an_unset_anonymous_setting_which_is_left_out(tmp_path, monkeypatch):
    """Lightning's ``WandbLogger`` gives ``wandb.init`` ``anonymous=None``, on which W&B warns in every run;
    lmheads' trainers leave it out. When Lightning stops passing it, this test says the fix can go."""
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(project="t", save_dir=str(tmp_path))
    assert "anonymous" in logger._wandb_init and logger._wandb_init["anonymous"] is None
    quiet_wandb(logger)
    assert "anonymous" not in logger._wandb_init and logger._wandb_init["project"] == "t"
    given = WandbLogger(project="t", save_dir=str(tmp_path), anonymous=True)
    quiet_wandb(given)
    assert given._wandb_init["anonymous"] == "allow"  # a setting given stays
