"""Lightning internals that lmheads relies on (lmheads/lightning_internals.py): these fail loudly, with
the attribute that moved, when a Lightning release changes them."""

from __future__ import annotations

import lightning as L

from lmheads.lightning_internals import align_logging_step, batches_done_this_epoch, stop_after_this_step


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
