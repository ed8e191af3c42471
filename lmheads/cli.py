"""``python -m lmheads``: LightningCLI with lmheads defaults, head short names and one-line errors."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from jsonargparse import set_loader
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.callbacks import ProgressBar as ProgressBarBase
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from lmheads.checkpointing import (
    RunCheckpoint,
    atomic_checkpoints,
    check_compatible,
    check_filename,
    read_checkpoint,
)
from lmheads.cmdline import (
    batch_counts,
    check_ckpt_path_kept,
    check_config_files,
    check_linked,
    given_options,
    option_values,
    take_options,
)
from lmheads.console import (
    explain_parse_error,
    progress_display,
    quiet_evaluation,
    quiet_lightning,
    user_error,
)
from lmheads.data import LMDataModule
from lmheads.errors import (
    CheckpointWriteError,
    ConfigError,
    Interrupted,
    TrainingStopped,
    failed_write,
    interrupted_outside_training,
)
from lmheads.files import read_record
from lmheads.generation import SamplingConfig
from lmheads.heads import head_name
from lmheads.heads.base import resolve_head
from lmheads.heads.names import PARSER_MODE, expand_head_names, load_yaml
from lmheads.lightning_internals import AlignLoggingStep, quiet_wandb
from lmheads.module import LMHeadModule
from lmheads.run.claim import NAMING_OPTION, RunFolder, unwritten
from lmheads.run.layout import RESULTS_FILE, furthest_checkpoint, run_of_checkpoint
from lmheads.run.plan import (
    DEFAULT_SAVE_DIR,
    NAMING_KEYS,
    Plan,
    loggers,
    naming,
    naming_logger,
    plan_run,
    point_loggers,
    require_logger_packages,
)
from lmheads.run.records import RunConfig, RunSummary, filed_line, record_evaluation
from lmheads.run.resume import (
    check_against_checkpoint,
    check_training,
    check_trains_something,
    checkpoint_by_keyword,
    evaluation_conflicts,
    is_checkpoint_keyword,
)
from lmheads.settings import check_settings, check_validation_interval
from lmheads.sharding import check_checkpoints, check_strategy
from lmheads.streams import pipe_safe_output


def trainer_defaults() -> dict[str, Any]:
    """TensorBoard and the callbacks every run has (fresh instances for each command)."""
    return {
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": DEFAULT_SAVE_DIR, "name": "lmheads", "default_hp_metric": False},
        },
        # The module prints its parameter counts (a shared tensor once); Lightning's table adds a FLOPs
        # column that stays zero without an example input.
        "enable_model_summary": False,
        "callbacks": [RunSummary()],
    }


class LMHeadsParser(LightningArgumentParser):
    """Lightning's parser, named ``python -m lmheads`` in usage lines (not ``__main__.py``) when run as a
    module: every parser of a command, those that print a class's options (``--model.head.help``)
    included. The ``lmheads`` script keeps its own name."""

    def __init__(self, *args, **kwargs) -> None:
        if Path(sys.argv[0]).name == "__main__.py":
            kwargs.setdefault("prog", "python -m lmheads")
        super().__init__(*args, **kwargs)


class LMHeadsCLI(LightningCLI):
    def __init__(self, *args, **kwargs) -> None:
        given = sys.argv[1:] if kwargs.get("args") is None else kwargs["args"]
        named = isinstance(given, list) and given[:1] and given[0] in LightningCLI.subcommands()
        self._subcommand_given = given[0] if named and kwargs.get("run", True) else None
        self.run_folder: RunFolder | None = None
        self.plan: Plan | None = None
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            if self.run_folder is not None:  # a start that failed leaves no folder behind
                self.run_folder.release()
            raise
        else:
            if self.run_folder is not None and self.trainer.fast_dev_run:
                self.run_folder.release()  # a dry run: Lightning logs and saves nothing, nor does lmheads
        finally:
            if self.run_folder is not None:
                self.run_folder.ended()

    def subcommands(self) -> dict[str, set[str]]:
        """The subcommand given, if one is: only its parser is built (each takes a fraction of a second
        of every command's start); all of them for ``--help`` and other input without one."""
        every = LightningCLI.subcommands()
        given = self._subcommand_given
        return {given: every[given]} if given else every

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        self._defaults_parser = parser  # every subcommand's parser has the same model defaults
        parser.set_defaults({"model.head": {"class_path": "lmheads.heads.tied.TiedHead"}})
        if "weights_only" in parser.get_defaults():  # checkpoints hold tensors and plain types only
            parser.set_defaults({"weights_only": True})
        parser.link_arguments("model.backbone.block_size", "data.init_args.block_size")
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.add_class_arguments(
            SamplingConfig, "sampling", help="Text generation for predict and for samples at validation."
        )

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        if args is None:
            args = sys.argv[1:]
        try:
            if isinstance(args, list):
                check_config_files(args)
                named = next((arg for arg in args if arg in LightningCLI.subcommands()), None)
                if named:  # before the parser, which would print such a config (--print_config)
                    check_linked(args, named)
                args = self._naming_to_its_logger(parser, expand_head_names(args))
                self.config = parser.parse_args(args)
            else:
                super().parse_arguments(parser, args)
        except argparse.ArgumentError as err:
            message = explain_parse_error(
                str(err), self._defaults_parser, args if isinstance(args, list) else None
            )
            raise ConfigError(message + _run_config_hint(str(err), args)) from None
        subcommand = self.config.get("subcommand")
        self._checkpoint = None
        self._other_data: list[str] = []
        self._filed: tuple[str, int] | None = None  # the checkpoint and step an evaluation is filed with
        # `1` batch is one batch, not 100% of them: given to the trainer as ints (the parser makes floats)
        self._batch_counts = batch_counts(args, subcommand) if isinstance(args, list) else {}
        if subcommand:
            config = self.config[subcommand]
            if isinstance(args, list):
                check_ckpt_path_kept(args, config.get("ckpt_path"))
            check_settings(subcommand, config)
            if is_checkpoint_keyword(config.get("ckpt_path")):
                self._resolve_keyword(subcommand, config)
            self._checkpoint = read_checkpoint(config.get("ckpt_path"))
            if self._checkpoint is not None:
                defaults = self._defaults_parser.get_defaults().model.as_dict()
                named = given_options(args, "model", subcommand) if isinstance(args, list) else ()
                run = run_of_checkpoint(config.ckpt_path)
                own = run / "config.yaml" if run is not None and (run / "config.yaml").is_file() else None
                self._other_data = check_against_checkpoint(
                    subcommand, config, self._checkpoint, defaults, named, own
                )
                if subcommand == "test":  # a test of part of the split is not the run's test
                    limit = self._batch_counts.get("limit_test_batches", config.trainer.limit_test_batches)
                    if limit is not None and (type(limit) is int or limit != 1.0):  # 1: a batch, 1.0: all
                        self._other_data.append(f"trainer.limit_test_batches={limit}: part of the test split")
            elif subcommand == "fit":
                check_trains_something(config)

    def _naming_to_its_logger(self, parser: LightningArgumentParser, args: list[str]) -> list[str]:
        """jsonargparse gives ``--trainer.logger.init_args.save_dir/name/version`` to the last logger of a
        list, and the first TensorBoard or CSV logger names the run folder (:mod:`lmheads.run.plan`).
        Where they differ (W&B added after TensorBoard), the options go to the logger that names the
        run, as the whole list in their place: naming a run (``tools/sweep.py`` does) works with any
        loggers after it. The list is the one parsed up to the first of them."""
        rest, taken, at = take_options(args, {f"--trainer.logger.init_args.{key}" for key in NAMING_KEYS})
        if not taken:
            return args
        try:
            probe = parser.parse_args([arg for arg in rest[:at] if not arg.startswith("--print_config")])
        except argparse.ArgumentError:  # what comes before them needs them (a logger's save_dir): as given
            return args
        config = probe[probe.subcommand] if probe.get("subcommand") else probe
        items, index = loggers(config), naming_logger(config)
        if not isinstance(config.trainer.get("logger"), list) or index is None or index == len(items) - 1:
            return args
        values = [item.as_dict() for item in items]
        for item in values:  # unset options as the parser left them (None would not validate where required)
            item["init_args"] = {k: v for k, v in item.get("init_args", {}).items() if v is not None}
        for option, value in taken:
            values[index]["init_args"][option.rpartition(".")[2]] = yaml.safe_load(value)
        return [*rest[:at], f"--trainer.logger={json.dumps(values, default=str)}", *rest[at:]]

    def _resolve_keyword(self, subcommand: str, config) -> None:
        """``--ckpt_path=last`` / ``best`` of the run the logger's version names, as that checkpoint's file
        (``None``: a fit that starts the run). A repeated command (a requeued job) so continues its run.
        Lightning resolves its keywords only once the model is built, among ``last*.ckpt`` files: too late
        to check the checkpoint against the options or to decide the folder, and blind to the run's
        ``interrupted.ckpt`` and requeue checkpoints."""
        save_dir, name, version = naming(config)
        run = None if version is None else save_dir / name / version
        keyword = config.ckpt_path
        found = checkpoint_by_keyword(keyword, subcommand, run)
        config.ckpt_path = None if found is None else str(found)
        if found is not None:
            rank_zero_info(f"--ckpt_path={keyword}: {found}")
        elif not (run.is_dir() and any(run.iterdir())):  # a folder that holds a run: its claim says more
            rank_zero_info(f"--ckpt_path=last: {run} holds no checkpoint; this fit starts that run")

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """The trainer, with lmheads' checkpointing, learning-rate monitor and progress bar unless the
        configuration brings its own (or turns them off)."""
        config = (self.config_init[self.subcommand] if self.subcommand else self.config_init).trainer
        given = config.get("callbacks") or []
        given = list(given) if isinstance(given, list | tuple) else [given]

        def has(kind: type) -> bool:
            return any(isinstance(c, kind) for c in given)

        defaults = []
        if config.get("enable_checkpointing", True) is not False and not has(ModelCheckpoint):
            defaults.append(
                RunCheckpoint(dirpath=None if self.plan is None else self.plan.folder / "checkpoints")
            )
        if config.get("logger") not in (False, None) and not has(LearningRateMonitor):
            defaults.append(LearningRateMonitor(logging_interval="step"))
        if config.get("enable_progress_bar", True) is not False and not has(ProgressBarBase):
            defaults.append(progress_display())
        kwargs = {**self._batch_counts, **kwargs}
        if self.plan is not None:  # the run's folder, also for Lightning's SLURM requeue checkpoints
            kwargs["default_root_dir"] = str(self.plan.folder)
        trainer = super().instantiate_trainer(callbacks=[AlignLoggingStep(), *given, *defaults], **kwargs)
        if self.plan is not None:  # a checkpoint callback of the user's own, too, unless it names a folder
            for callback in trainer.checkpoint_callbacks:
                callback.dirpath = callback.dirpath or str(self.plan.folder / "checkpoints")
                if self.subcommand == "fit" and Path(callback.dirpath) == self.plan.folder / "checkpoints":
                    check_filename(callback)
        atomic_checkpoints(trainer)
        for logger in trainer.loggers:
            quiet_wandb(logger)
        return trainer

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if self.run_folder is not None:
            self.run_folder.trainer = self.trainer
        check_strategy(self.trainer.strategy, self.model)  # before any process is launched
        if self.subcommand == "fit":
            check_checkpoints(self.trainer.strategy)
        if self.run_folder is not None and self.run_folder.resume:
            check_training(self.run_folder.path, self.model, self.trainer, self.datamodule)
        if self._checkpoint is not None:  # here too for strategies that load the weights themselves (FSDP2)
            check_compatible(self.model, self._checkpoint["state_dict"])
            self._checkpoint = None
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        self.model.sampling = config.sampling
        block = self.model.backbone.cfg.block_size
        if self.subcommand == "predict" and config.sampling.prompt_tokens > block:
            raise ConfigError(  # a longer prompt would be cut to the block
                f"sampling.prompt_tokens={config.sampling.prompt_tokens} is longer than the model's context "
                f"(model.backbone.block_size={block}), and a prompt is the start of a block: give at most "
                f"{block}"
            )

    def before_instantiate_classes(self) -> None:
        """Plan the command's folder (:func:`lmheads.run.plan.plan_run`), point every logger at it and
        claim it (:class:`lmheads.run.claim.RunFolder`); the trainer, its checkpoint callbacks and the
        saved config follow it when they are made."""
        if self.subcommand is None:  # run=False only builds: no command owns a folder
            return
        config = self.config[self.subcommand]
        require_logger_packages(config)
        if self.subcommand == "fit":
            trainer = config.trainer
            accumulate = trainer.accumulate_grad_batches or 1
            check_validation_interval(trainer.val_check_interval, accumulate, trainer.limit_val_batches)
        if self.subcommand in ("validate", "test", "predict"):
            quiet_evaluation()
        ckpt = config.get("ckpt_path")
        run = run_of_checkpoint(ckpt) if self._checkpoint is not None else None
        step = self._checkpoint.get("global_step", 0) if self._checkpoint is not None else 0
        head = head_name(resolve_head(str(config.model.head.class_path)))
        now = time.strftime("%Y%m%d-%H%M%S")
        self.plan = plan = plan_run(self.subcommand, config, head, now, run, step, ckpt or "")
        if plan.resume:
            _refuse_going_back(run, step, ckpt)
        if plan.resume or plan.filed_in is not None:  # what it checks the command against, before it runs
            read_record(run / "hparams.yaml")
        set_aside = point_loggers(config, plan, step)
        self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": plan.config_file}
        self.run_folder = RunFolder(plan.folder, resume=plan.resume, start_step=step)
        try:
            self.run_folder.claim()
        except ConfigError as err:
            raise ConfigError(self._why_not_claimed(err, plan, run, ckpt)) from None
        for name, new_name in set_aside:
            if self.run_folder.set_aside(name, new_name):
                rank_zero_info(
                    f"{name} starts anew at step {step}; the run's earlier one is kept as {new_name}"
                )
        if plan.filed_in is not None:
            self._filed = (ckpt, step)
            record_evaluation(plan.folder, ckpt, step, self._other_data)

    def _why_not_claimed(self, err: ConfigError, plan: Plan, run: Path | None, ckpt) -> str:
        if self.subcommand != "fit" and run is not None and plan.filed_in is None:
            return (  # a run's config.yaml given with another run's checkpoint
                f"the configuration names the run {plan.folder}, and the checkpoint {ckpt} is of another "
                f"run, {run}: to {self.subcommand} it, give --config {run / 'config.yaml'} before "
                f"--ckpt_path (or another {NAMING_OPTION})"
            )
        if self.subcommand == "fit" or ckpt:
            return str(err)
        # the run's config.yaml without a checkpoint
        return f"{err}. To {self.subcommand} a checkpoint of that run, give --ckpt_path after --config"

    def before_validate(self) -> None:
        self._say_what_is_evaluated()

    def before_test(self) -> None:
        self._say_what_is_evaluated()

    def before_predict(self) -> None:
        self._say_what_is_evaluated()

    def _say_what_is_evaluated(self) -> None:
        """Without a checkpoint, an evaluation is of the model as initialised: said, as it is rarely meant."""
        if not self.config[self.subcommand].get("ckpt_path"):
            rank_zero_info(
                f"{self.subcommand}: no --ckpt_path, so this is the untrained model as initialised (a run's: "
                "--ckpt_path=<run>/checkpoints/last.ckpt, or its best step<N>.ckpt)"
            )

    def after_validate(self) -> None:
        self._say_where_filed()

    def after_test(self) -> None:
        self._say_where_filed()

    def after_predict(self) -> None:
        self._say_where_filed()

    def _say_where_filed(self) -> None:
        """Where an evaluation's metrics (or a predict's samples) went, once it has run."""
        if self.run_folder is None:
            return
        if self._filed is not None:  # the data's text is known once loaded, the precision once set up
            found = [
                *getattr(self.datamodule, "other_text", []),
                *evaluation_conflicts(self.plan.filed_in, str(self.trainer.precision)),
            ]
            if found:
                self._other_data = [*self._other_data, *found]
                record_evaluation(self.run_folder.path, *self._filed, self._other_data)
        rank_zero_info(filed_line(self.subcommand, self.run_folder.path, self._other_data))


def _refuse_going_back(run: Path, step: int, ckpt) -> None:
    """A fit that continues ``run`` from a checkpoint at ``step`` the run went past would write over its
    later steps: past a later checkpoint, or to where a fit of it ended (``results.json``), of which a
    checkpoint callback of the user's may have kept none."""
    furthest = furthest_checkpoint(run)
    if furthest is not None and furthest[0] > step:
        raise ConfigError(
            f"the checkpoint {ckpt} is at step {step}, but its run went on to step {furthest[0]} "
            f"({furthest[1].name}): continuing from it would write over steps {step}-{furthest[0]} "
            f"of that run. Continue the run with --ckpt_path={furthest[1]}, or start a new run from "
            f"this checkpoint with another {NAMING_OPTION}"
        )
    ended = read_record(run / RESULTS_FILE).get("step")
    if isinstance(ended, int) and ended > step:
        raise ConfigError(
            f"the checkpoint {ckpt} is at step {step}, but its run trained on to step {ended} and kept "
            f"no checkpoint of that state: continuing from it would write over steps {step}-{ended} of "
            f"that run. Start a new run from this checkpoint with another {NAMING_OPTION}"
        )


def _run_config_hint(message: str, args) -> str:
    """For options missing from a command given a run's checkpoint: the run's own configuration."""
    if "arguments are required" not in message or not isinstance(args, list):
        return ""
    given = option_values(args, "--ckpt_path")
    run = run_of_checkpoint(given[-1]) if given and given[-1] else None  # the last one given counts
    if run is None or not (run / "config.yaml").is_file():
        return ""
    return f"; for the run's own configuration, put --config {run / 'config.yaml'} before --ckpt_path"


def main(args: list[str] | None = None, run: bool = True) -> LMHeadsCLI | None:
    """Entry point of ``python -m lmheads``; bad input ends with one ``error:`` line and exit status 2, a
    non-finite loss with status 3, Ctrl-C / SIGTERM (after saving a checkpoint) with 130 / 143.

    ``run=False`` parses and instantiates without a subcommand (the arguments then start with the
    options, e.g. ``["--config", "configs/quickstart.yaml"]``). ``heads [MODULE ...]`` lists the available
    heads, after importing the given modules.
    """
    quiet_lightning()
    with pipe_safe_output():
        return _main(args, run)


def _stopped_outside_training(pid: int, signum, frame) -> None:
    if os.getpid() == pid:  # not in a DataLoader worker forked from the command, which the command stops
        raise interrupted_outside_training(signum)


def _reported_by_the_command(hook, args) -> None:
    """A thread's uncaught exception, passed to ``hook`` unless it is a write that failed for want of space
    or on a read-only file system: a writer thread's (TensorBoard's) is raised again where the command
    next writes through it, and said there in one line."""
    if failed_write(args.exc_value) is None:
        hook(args)


def _main(args: list[str] | None, run: bool) -> LMHeadsCLI | None:
    argv = sys.argv[1:] if args is None else args
    previous = {}
    thread_hook, threading.excepthook = (
        threading.excepthook,
        partial(_reported_by_the_command, threading.excepthook),
    )
    if threading.current_thread() is threading.main_thread():
        # Until training starts (where the interruption callback takes them over), Ctrl-C and SIGTERM end
        # the command like any failed start: what it created is removed (a sweep can then start it again).
        stopped = partial(_stopped_outside_training, os.getpid())
        previous = {s: signal.signal(s, stopped) for s in (signal.SIGINT, signal.SIGTERM)}
    set_loader(PARSER_MODE, load_yaml, exceptions=(yaml.YAMLError,))
    try:
        if argv[:1] == ["heads"]:  # python -m lmheads heads [MODULE ...]
            from lmheads.heads.names import main as heads

            heads(argv[1:])
            return None
        if argv[:1] == ["export"]:  # python -m lmheads export CHECKPOINT OUT_DIR
            from lmheads.hf import main as export

            export(argv[1:])
            return None
        if argv[:1] == ["harness"]:  # python -m lmheads harness CHECKPOINT --tasks ...
            from lmheads.harness import main as harness

            harness(argv[1:])
            return None
        return LMHeadsCLI(
            LMHeadModule,
            LMDataModule,
            subclass_mode_data=True,
            seed_everything_default=0,
            auto_configure_optimizers=False,
            trainer_defaults=trainer_defaults(),
            save_config_callback=RunConfig,
            save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
            parser_kwargs={
                "parser_mode": PARSER_MODE,  # short head names in config files
                "exit_on_error": False,  # bad options become one error line (explain_parse_error)
                "allow_abbrev": False,  # --trainer.max_step must not silently mean max_steps
                "description": "Train and compare output heads of decoder-only language models. "
                "`python -m lmheads heads [MODULE ...]` lists the available heads; `python -m lmheads "
                "export CHECKPOINT OUT_DIR` writes a model that HF transformers loads; `python -m lmheads "
                "harness CHECKPOINT` scores it with lm-evaluation-harness.",
            },
            parser_class=LMHeadsParser,
            args=args,
            run=run,
        )
    except Interrupted as err:
        if rank_zero_only.rank == 0:  # every process stops; one says so
            print(f"interrupted: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except TrainingStopped as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except Exception as err:
        message = user_error(err)
        if message is None and (full := failed_write(err)) is not None:  # a log's writer, say
            print(f"error: {unwritten(full)}", file=sys.stderr)
            sys.exit(CheckpointWriteError.exit_code)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    finally:
        threading.excepthook = thread_hook
        for signum, handler in previous.items():
            signal.signal(signum, handler)
