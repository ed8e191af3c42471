"""Settings refused before anything is built or written: those Lightning takes and then fails on (a
division by zero in the first steps, a traceback), runs nothing with (an empty evaluation filed in the
run), or runs otherwise than the run records."""

from __future__ import annotations

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
