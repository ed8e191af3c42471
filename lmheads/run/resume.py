"""What a fit that continues a run must agree with, before it starts: the model options its checkpoint
was trained with (Lightning would apply the checkpoint's over them), the data it read (Lightning restores
none), the run's tokens a step and precision (no trainer option is restored either), and the run's
furthest state (an earlier checkpoint would write over later steps)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from lightning.pytorch.callbacks import Timer

from lmheads.checkpointing import lowest_loss_checkpoint, read_checkpoint
from lmheads.data.base import file_digest
from lmheads.dotted import flatten
from lmheads.errors import ConfigError
from lmheads.files import read_record
from lmheads.reporting import tokens_per_step, training_settings
from lmheads.run.layout import furthest_checkpoint, run_checkpoints


def checkpoint_conflicts(
    given: dict, defaults: dict, stored: dict, section: str = "model", named: Iterable[str] = ()
) -> list[str]:
    """Options of the configuration that contradict the values a checkpoint was trained with, as ``key:
    value here, value in the checkpoint``: those that differ from their defaults, and those the command
    names (``named``, as :func:`lmheads.cmdline.given_options` gives them), even at their defaults."""
    given, defaults, stored = flatten(given), flatten(defaults), flatten(stored)
    named = {_without_init_args(key) for key in named}

    def is_named(key: str) -> bool:
        key = _without_init_args(key)
        return "" in named or any(key == n or key.startswith(f"{n}.") for n in named)

    return [
        f"{section}.{key}: {value!r} here, {stored[key]!r} in the checkpoint"
        for key, value in given.items()
        if key in stored and (value != defaults.get(key) or is_named(key)) and value != stored[key]
    ]


def _without_init_args(key: str) -> str:
    return ".".join(part for part in key.split(".") if part != "init_args")


#: Lightning's names for a checkpoint it finds by itself (``registry:<name>`` too).
CHECKPOINT_KEYWORDS = ("last", "best", "hpc", "registry")


def is_checkpoint_keyword(ckpt: object) -> bool:
    return isinstance(ckpt, str) and (ckpt in CHECKPOINT_KEYWORDS or ckpt.startswith("registry:"))


def checkpoint_by_keyword(keyword: str, subcommand: str, run: Path | None) -> Path | None:
    """The file ``--ckpt_path=last`` or ``--ckpt_path=best`` stands for in ``run``, the run the logger's
    ``version`` names: ``last`` is the run's furthest state (``None`` when it has no checkpoint yet: a
    fit then starts the run, so that one command, run again, continues it), ``best`` its checkpoint with
    the lowest validation loss. Lightning would look in the folder of the run this command starts, find
    nothing and start from scratch: without a named run, and for its other keywords, the keyword is
    refused."""
    example = "runs/<name>/<run>/checkpoints/last.ckpt"
    if keyword not in ("last", "best"):
        raise ConfigError(
            f"--ckpt_path={keyword} is not supported: give a checkpoint file ({example}), or "
            "--ckpt_path=last with --trainer.logger.init_args.version=<run> for a run's furthest state"
        )
    if run is None:
        raise ConfigError(
            f"--ckpt_path={keyword} needs the run it refers to: name it with "
            "--trainer.logger.init_args.version=<run> (with the run's save_dir and name), or give a "
            f"checkpoint file ({example})"
        )
    if keyword == "last":
        furthest = furthest_checkpoint(run)
        if furthest is None and subcommand != "fit":
            raise ConfigError(f"--ckpt_path=last: the run {run} has no checkpoint to {subcommand}")
        return None if furthest is None else furthest[1]
    if subcommand == "fit":
        raise ConfigError(
            "--ckpt_path=best does not continue a run (training from it would write over the run's later "
            "steps): continue the run with --ckpt_path=last, or give the best checkpoint's file and "
            "another --trainer.logger.init_args.version to start a new run from it"
        )
    best = _best_checkpoint(run)
    if best is None:
        raise ConfigError(
            f"--ckpt_path=best: the run {run} has no checkpoint kept for its lowest validation loss (none "
            "yet, or its checkpoint callbacks keep none by monitor=val/loss, mode=min); give a checkpoint "
            "file"
        )
    if not best.is_file():
        raise ConfigError(
            f"--ckpt_path=best: the run's checkpoint of the lowest validation loss, {best}, is no longer "
            f"there (deleted or moved); give another of its checkpoints (a file in {best.parent}, or "
            "--ckpt_path=last)"
        )
    return best


def _best_checkpoint(run: Path) -> Path | None:
    """The checkpoint of the lowest validation loss that the checkpoint callbacks' states name, in any of
    the run's checkpoints (one written before a validation, by a callback that keeps one every few
    steps, lacks what that validation chose), in the run's ``checkpoints`` folder (where the run lies
    now, not where it was written), whether or not it is still there."""
    states = []
    for path in run_checkpoints(run):
        try:
            states += (read_checkpoint(str(path)).get("callbacks") or {}).items()
        except ConfigError:  # unreadable: it names none
            continue
    best = lowest_loss_checkpoint(states)
    return None if best is None else run / "checkpoints" / Path(best).name


def training_conflicts(run: Path, now: dict[str, int | float | str]) -> list[str]:
    """How this start would train a run it continues otherwise than the run trained, by the run's
    ``hparams.yaml``: another number of tokens a step (devices x accumulated batches; the data's batch
    is checked with the data), precision, gradient clipping (its value or algorithm), or another seed
    (which a resume does not use: it restores the run's random state, so only the record would change).
    Trading devices for accumulation keeps the budget. Settings the run did not record are not
    compared."""
    then = _recorded(run)
    if not then:
        return []

    def shape(hp: dict) -> str:
        return (
            f"{hp['tokens_per_step']:,} tokens a step ({hp.get('devices')} device(s) x "
            f"accumulate_grad_batches={hp.get('accumulate_grad_batches')})"
        )

    out = []
    if then.get("tokens_per_step") not in (None, now["tokens_per_step"]):
        out.append(f"the run trained {shape(then)}, this start would train {shape(now)}")
    clipping = then.get("gradient_clip_val") not in (None, now["gradient_clip_val"])
    for key in ("precision", "gradient_clip_val", "gradient_clip_algorithm", "seed"):
        if key == "gradient_clip_algorithm" and clipping:
            continue  # another clipping value says it already
        if then.get(key) not in (None, now[key]):
            out.append(f"{key}: {then[key]} in the run, {now[key]} here")
    return out


def evaluation_conflicts(run: Path, precision: str) -> list[str]:
    """How an evaluation of ``run``'s checkpoint computes otherwise than the run trained, by its
    ``hparams.yaml``: at another precision (bf16 logits, or weights cast to bf16, move the loss), which
    its record names so that ``compare.py`` does not take it for the run's own."""
    then = _recorded(run).get("precision")
    return [] if then in (None, precision) else [f"trainer.precision={precision}: the run trained in {then}"]


def _recorded(run: Path) -> dict:
    """The run's ``hparams.yaml`` (empty where it has none; one that does not parse is refused: the run
    would go on unchecked, and its next save would replace the record)."""
    return read_record(run / "hparams.yaml")


def check_training(run: Path, model, trainer, datamodule) -> None:
    """Refuse a fit that would continue ``run`` with another batch, precision, clipping or seed (see
    :func:`training_conflicts`): Lightning restores no trainer option, and the run would go on under this
    start's."""
    now = {
        "tokens_per_step": tokens_per_step(model, trainer, datamodule),
        "devices": trainer.world_size,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        **training_settings(trainer),
    }
    differ = training_conflicts(run, now)
    if differ:
        raise ConfigError(
            f"{'; '.join(differ)}. Continuing would change how the run trains or what its record says: "
            "give the settings it trained with (its hparams.yaml), or train a new run"
        )


#: Data options a resumed run may change: neither its training and validation data nor their batches.
FREE_ON_RESUME = frozenset({"num_workers", "num_proc", "cache_dir", "test_file"})
#: Data options an evaluation of a run's checkpoint may change and still evaluate the run's data (the
#: metrics are token-weighted, whatever the batch); a test file counts where the run named one.
FREE_ON_EVALUATION = frozenset({"num_workers", "num_proc", "cache_dir", "batch_size"})


def data_sources(checkpoint: dict) -> dict[str, str]:
    """What the checkpoint's data module recorded of the text it read: ``<split>_file`` -> the file's
    SHA-256, ``<split>_text`` -> a dataset's text's (:attr:`lmheads.data.base.LMDataModule.sources`)."""
    cls = str((checkpoint.get("datamodule_hyper_parameters") or {}).get("_class_path", ""))
    state = checkpoint.get(cls.rpartition(".")[2]) if cls else None  # Lightning keys it by class name
    return dict(state.get("sources") or {}) if isinstance(state, dict) else {}


def data_conflicts(given: dict, checkpoint: dict, free: frozenset[str] = FREE_ON_RESUME) -> list[str]:
    """Data options of this configuration (``{"class_path": ..., "init_args": {...}}``) that differ from
    those a checkpoint's run trained with (its datamodule's saved hyperparameters), as ``key: value here,
    value in the checkpoint``; options in ``free`` aside, and those the run left unset. Unlike the model's,
    Lightning does not restore these: a resumed run reads whatever data this configuration describes. A
    data file counts by what it holds, not by its path, where the checkpoint kept the digests of the files
    its run read."""
    stored = {
        k: v for k, v in (checkpoint.get("datamodule_hyper_parameters") or {}).items() if k != "_instantiator"
    }
    if not stored:
        return []
    cls = stored.pop("_class_path", None)
    sources = data_sources(checkpoint)
    theirs = flatten({"init_args": stored} | ({"class_path": cls} if cls else {}))
    ours = flatten({"class_path": given.get("class_path"), "init_args": given.get("init_args") or {}})
    out = []
    for key, value in ours.items():
        name = key.removeprefix("init_args.")
        if key not in theirs or name in free or (theirs[key] is None and name == "test_file"):
            continue
        if name in sources and value is not None:  # the file it read, wherever it lies now (a file
            # that is missing gets its own error when the data module is built)
            if Path(value).is_file() and file_digest(value) != sources[name]:
                what = f"{value!r} holds other text than {theirs[key]!r} held"
                out.append(f"data.{name}: {what} when the checkpoint's run read it")
        elif value != theirs[key]:
            out.append(f"data.{name}: {value!r} here, {theirs[key]!r} in the checkpoint")
    return out


def check_against_checkpoint(
    subcommand: str,
    config,
    checkpoint: dict,
    model_defaults: dict,
    named: Iterable[str] = (),
    run_config: Path | None = None,
) -> list[str]:
    """Refuse model options that contradict the checkpoint (Lightning would silently apply the
    checkpoint's over them; ``named`` are those the command sets, ``run_config`` the run's own
    configuration, named as the way out), a fit on other data, and a fit that would train nothing. For
    an evaluation: its data options other than the run's (it may evaluate other data, and its record
    says so)."""
    stored = checkpoint.get("hyper_parameters") or {}
    conflicts = checkpoint_conflicts(config.model.as_dict(), model_defaults, stored, named=named)
    if conflicts:
        raise ConfigError(
            f"the checkpoint {config.ckpt_path} was trained with other options: {'; '.join(conflicts)}. "
            "Drop these options (from the command line or its --config files) to use the checkpoint's"
            + (f", put --config {run_config} before --ckpt_path for the run's own" if run_config else "")
            + ", or train a new run without --ckpt_path"
        )
    data = config.get("data")
    given = data.as_dict() if data is not None and hasattr(data, "as_dict") else None
    if given is None:
        return []
    if subcommand != "fit":  # recorded with an evaluation filed in the run
        return data_conflicts(given, checkpoint, FREE_ON_EVALUATION)
    differ = data_conflicts(given, checkpoint)
    if differ:
        raise ConfigError(
            f"the checkpoint {config.ckpt_path} was trained on other data: {'; '.join(differ)}. "
            "Resuming would continue that run on other data: give the data it trained on (its "
            "options are in the run's config.yaml), or train a new run without --ckpt_path"
        )
    check_trains_something(config, checkpoint.get("global_step", 0))
    check_epochs_left(config, checkpoint)
    check_time_left(config, checkpoint)
    return []


def epochs_trained(checkpoint: dict) -> int | None:
    """Whole epochs a checkpoint has trained, however Lightning's counters stood when it was taken (in an
    epoch, at its last batch, in the epoch-end hooks or after ``fit``): the epochs begun before the last
    one, and the last one if its last batch is done."""
    loop = checkpoint.get("loops", {}).get("fit_loop")
    if not loop:
        return None
    started = loop["epoch_progress"]["total"]["started"]
    return max(started - 1, 0) + int(bool(loop["epoch_loop.batch_progress"]["is_last_batch"]))


def check_epochs_left(config, checkpoint: dict) -> None:
    """Refuse to continue a run that has trained its ``trainer.max_epochs`` already: it would train nothing
    (or, from a checkpoint of its last batch, a batch past the end)."""
    max_epochs, done = config.trainer.get("max_epochs"), epochs_trained(checkpoint)
    if max_epochs is not None and done is not None and 0 <= max_epochs <= done:
        raise ConfigError(
            f"the checkpoint {config.ckpt_path} has trained {done} epoch{'s' * (done != 1)} and "
            f"trainer.max_epochs={max_epochs}: nothing to train. To continue it, pass --trainer.max_epochs "
            f"larger than {done}"
        )


def check_time_left(config, checkpoint: dict) -> None:
    """Refuse to continue a run whose training time already fills ``trainer.max_time`` (Lightning's
    ``Timer`` counts the run's time, not this start's): it would train nothing."""
    max_time = config.trainer.get("max_time")
    timer = Timer(duration=max_time) if max_time else None
    if timer is None or timer.state_key not in checkpoint.get("callbacks", {}):
        return
    timer.load_state_dict(checkpoint["callbacks"][timer.state_key])
    if timer.time_remaining("train") <= 0:
        trained = math.ceil(timer.time_elapsed("train"))
        more = trained + 3600
        example = f"{more // 86400:02d}:{more % 86400 // 3600:02d}:{more % 3600 // 60:02d}:{more % 60:02d}"
        raise ConfigError(
            f"the checkpoint {config.ckpt_path} has trained for {trained} s and trainer.max_time={max_time} "
            f"counts that time: nothing to train. To continue it, pass a longer --trainer.max_time "
            f"(DD:HH:MM:SS; {example} for an hour more)"
        )


def check_trains_something(config, step: int | None = None) -> None:
    """Refuse a fit that would train nothing: a ``max_steps``, ``max_epochs`` or ``limit_train_batches`` of
    0 (Lightning then skips training), or with a checkpoint at ``step``, a ``max_steps`` it has reached."""
    trainer = config.trainer
    max_steps = -1 if trainer.get("max_steps") is None else trainer.max_steps
    if step is not None and 0 <= max_steps <= step:
        raise ConfigError(
            f"the checkpoint {config.ckpt_path} is at step {step} and trainer.max_steps={max_steps}: "
            f"nothing to train. To continue it, pass --trainer.max_steps larger than {step}"
        )
    zero = "max_steps" if max_steps == 0 else None
    if trainer.get("max_epochs") == 0:  # training stops at whichever limit comes first
        zero = "max_epochs"
    if trainer.get("limit_train_batches") == 0:
        zero = "limit_train_batches"
    if zero:
        raise ConfigError(
            f"trainer.{zero}=0 trains nothing and would leave a run of no steps: give a positive "
            f"--trainer.{zero} (validate or test without --ckpt_path evaluate an untrained model)"
        )
