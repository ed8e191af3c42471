"""The places lmheads reaches into Lightning (2.6) where it has no public way, kept in one file;
``tests/test_lightning_internals.py`` fails loudly when a Lightning release changes them."""

from __future__ import annotations

import lightning as L


def batches_done_this_epoch(trainer: L.Trainer) -> int:
    """Batches of the current epoch trained before a resume: where a resumable sampler starts again.
    (Lightning restores its loop progress before it asks for the loaders.)"""
    return trainer.fit_loop.epoch_loop.batch_progress.current.completed


def stop_after_this_step(trainer: L.Trainer) -> None:
    """Make Lightning stop after the current step as after SIGTERM: it then raises ``SIGTERMException``
    out of the loop, which the interruption callback turns into a checkpoint. (``trainer.should_stop``
    would end the fit normally, and not before ``min_steps``.)"""
    trainer._signal_connector.received_sigterm = True
