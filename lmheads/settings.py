"""Settings refused before anything is written: those Lightning takes and then fails on (a division by
zero in the first steps, a traceback), runs nothing with (an empty evaluation filed in the run), or runs
otherwise than the run records (validations between the batches of an optimizer step, checked again
once Lightning has sized the epoch)."""

from __future__ import annotations

import math

import lightning as L
import torch

from lmheads.errors import ConfigError


def check_settings(subcommand: str, config) -> None:
    """The seed and the trainer's settings of a parsed ``subcommand`` config."""
    seed = config.get("seed_everything")
    if type(seed) is int and not 0 <= seed < 2**32:  # Lightning's check is a traceback
        raise ConfigError(
            f"seed_everything={seed} is not a seed numpy takes: give one from 0 to {2**32 - 1:,}"
        )
    _check_trainer(subcommand, config.trainer)


#: The batches each evaluation runs over (a fit's: :func:`lmheads.run.resume.check_trains_something`).
EVALUATED = {
    "validate": "limit_val_batches",
    "test": "limit_test_batches",
    "predict": "limit_predict_batches",
}


def _check_trainer(subcommand: str, trainer) -> None:
    """Trainer settings Lightning takes and then fails on (a division by zero in the first steps), runs
    nothing with (an empty evaluation filed in the run), or runs otherwise than the run records: a
    negative clipping value reverses every gradient, and 16-mixed on the CPU becomes bf16-mixed."""
    if str(trainer.get("precision")) in ("16", "16-mixed") and _on_cpu(trainer.get("accelerator")):
        raise ConfigError(
            f"trainer.precision={trainer.precision} on the CPU: Lightning would run it as bf16-mixed, while "
            "the run's config says 16-mixed; give --trainer.precision=bf16-mixed, or 32-true"
        )
    limit = EVALUATED.get(subcommand)
    if limit is not None and trainer.get(limit) == 0:  # Lightning then skips the loop, with a warning
        raise ConfigError(
            f"trainer.{limit}=0 evaluates nothing: give a number of batches, or a fraction of them"
        )
    if subcommand != "fit":
        return
    for option in ("accumulate_grad_batches", "log_every_n_steps", "check_val_every_n_epoch"):
        value = trainer.get(option)
        if value is not None and value < 1:
            raise ConfigError(f"trainer.{option}={value}: give a number of at least 1")
    interval = trainer.get("val_check_interval")
    if interval is not None and interval <= 0:
        raise ConfigError(
            f"trainer.val_check_interval={interval}: give a number of training batches, or a fraction of an "
            "epoch above 0"
        )
    clip = trainer.get("gradient_clip_val")
    if clip is not None and clip < 0:
        raise ConfigError(
            f"trainer.gradient_clip_val={clip} would reverse every gradient: give a positive value, or 0 "
            "(or null) for no clipping"
        )


def _on_cpu(accelerator) -> bool:
    """Whether Lightning runs on the CPU with this ``trainer.accelerator`` (``auto``: where there is no
    GPU torch can use)."""
    if accelerator == "cpu":
        return True
    return (
        accelerator in (None, "auto")
        and not torch.cuda.is_available()
        and not torch.backends.mps.is_available()
    )


def check_validation_interval(val_check_interval, accumulate: int, limit_val_batches=None) -> None:
    """Before anything is written: with gradient accumulation, a ``val_check_interval`` of batches (as
    Lightning counts it) that is not a multiple of ``accumulate`` validates, and checkpoints, between the
    batches of one optimizer step (see :func:`check_validations_end_steps`); without validation
    (``limit_val_batches`` 0) it never does."""
    if limit_val_batches == 0:
        return
    if accumulate > 1 and isinstance(val_check_interval, int) and val_check_interval % accumulate:
        below = val_check_interval // accumulate * accumulate
        closest = f"{below} or {below + accumulate}" if below else str(accumulate)
        raise ConfigError(
            f"val_check_interval={val_check_interval} counts training batches, and with "
            f"accumulate_grad_batches={accumulate} an optimizer step takes {accumulate} of them: validations "
            f"would fall between a step's batches, and a checkpoint taken there resumes without them. "
            f"Give --trainer.val_check_interval a multiple of {accumulate} (e.g. {closest})"
        )


def check_validations_end_steps(trainer: L.Trainer) -> None:
    """Once Lightning has sized the epoch: every validation must come at the end of an optimizer step.
    Lightning counts ``val_check_interval`` in batches, and starts each epoch's gradient accumulation
    afresh (an epoch ends with a shorter step where its batches do not divide): a validation between a
    step's batches would log the step as done, and its checkpoint would resume without the gradients of
    the batches already accumulated, which no checkpoint holds."""
    accumulate, every, batches = (
        trainer.accumulate_grad_batches,
        trainer.val_check_batch,
        trainer.num_training_batches,
    )
    if accumulate <= 1 or not trainer.enable_validation or every is None:
        return
    if not all(isinstance(n, int) for n in (every, batches)):  # an iterable without a length
        return
    across = trainer.check_val_every_n_epoch is None
    period = every * batches // math.gcd(every, batches) if across else batches  # then it repeats
    # a validation after a batch that is not its epoch's last nor ends a run of accumulated batches
    within = (t % batches or batches for t in range(every, period + 1, every))
    if not any(t != batches and t % accumulate for t in within):
        return
    multiple = f"give --trainer.val_check_interval as a number of batches, a multiple of {accumulate}"
    if across and batches % accumulate:  # the steps start afresh at each epoch, off the count across them
        advice = "count it within each epoch (--trainer.check_val_every_n_epoch=1)"
        advice += f" and {multiple}" if every % accumulate else ""
    else:
        advice = multiple
    raise ConfigError(
        f"validation every {every} training batches ({'across epochs' if across else 'within each epoch'}) "
        f"falls between the batches of an optimizer step (accumulate_grad_batches={accumulate}, {batches} "
        "batches an epoch): it would log the step as done, and a checkpoint taken there resumes without "
        f"the step's earlier batches. To validate at the end of steps, {advice}"
    )
