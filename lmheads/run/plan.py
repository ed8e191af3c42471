"""Where a command writes: one pure decision (:func:`plan_run`), then every writer pointed there
(:func:`point_loggers`; the CLI points the checkpoint callback, the saved config and the trainer's
``default_root_dir`` at the same folder).

A run folder is ``<save_dir>/<name>/<version>``. The first TensorBoard or CSV logger in
``trainer.logger`` names it (``--trainer.logger.init_args.version=NAME``); without one (W&B or MLflow
alone, or no logger) it is ``<trainer.default_root_dir or runs>/lmheads/<version>``. An unnamed version
is ``<head>-seed<seed>-<time>`` (``<head>-unseeded-<time>`` with ``seed_everything=false``), with
``-<subcommand>`` for an evaluation.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

from lmheads.dotted import class_of
from lmheads.errors import ConfigError, require
from lmheads.run.claim import CLAIM_FILE, NAMING_OPTION
from lmheads.run.layout import MLFLOW_ARTIFACTS, free_name, mlflow_run_id, mlflow_store, wandb_run_id

#: Where run folders go unless ``trainer.default_root_dir`` or the logger says otherwise.
DEFAULT_SAVE_DIR = "runs"
DEFAULT_NAME = "lmheads"
#: Loggers whose ``save_dir/name/version`` is a folder of its own: the first of them names the run.
NAMING_LOGGERS = (TensorBoardLogger, CSVLogger)


@dataclass(frozen=True)
class Plan:
    """Where one command writes. ``folder`` is the run's (a fit's) or the evaluation's; ``filed_in`` the
    run an evaluation of one of its checkpoints is filed in (``folder`` is then inside it)."""

    folder: Path
    resume: bool = False
    filed_in: Path | None = None
    config_file: str = "config.yaml"


def loggers(config) -> list:
    """``trainer.logger`` as a list of ``class_path``/``init_args`` namespaces (``[]``: none, or
    ``true``, which the CLI's default replaces)."""
    logger = config.trainer.get("logger")
    items = logger if isinstance(logger, list) else [logger]
    return [item for item in items if hasattr(item, "init_args")]


def require_logger_packages(config) -> None:
    """One ``ConfigError`` for a logger of ``config`` whose package is not installed (jsonargparse would
    report it as a page of type errors), before the command makes its folder."""
    for logger in loggers(config):
        cls = class_of(str(logger.class_path))
        if cls is not None and issubclass(cls, WandbLogger):
            require("the W&B logger (WandbLogger)", "wandb", "wandb")
        elif cls is not None and issubclass(cls, MLFlowLogger):  # no extra of lmheads'
            require("the MLflow logger (MLFlowLogger)", None, "mlflow")
            if run_mlflow_store(logger.init_args.get("tracking_uri")):
                require("MLflow's store in the run folder (a SQLite database)", None, "sqlalchemy", "alembic")


def run_mlflow_store(tracking_uri: str | None) -> bool:
    """Whether MLflow logs into a store in the run folder: no ``tracking_uri`` given, or one that a run's
    saved config recorded (a SQLite file in a run folder), which a continuation points at the run again."""
    if tracking_uri is None:
        return True
    path = Path(tracking_uri.removeprefix("sqlite:///"))
    return tracking_uri.startswith("sqlite:///") and (path.parent / CLAIM_FILE).is_file()


#: The options of the logger that names the run folder, given on the command line as
#: ``--trainer.logger.init_args.<key>`` (the CLI gives them to that logger in a list of several).
NAMING_KEYS = ("save_dir", "name", "version")


def naming_logger(config) -> int | None:
    """Where among :func:`loggers` the one that names the run folder is (the first TensorBoard or CSV
    logger), ``None`` where none names it."""
    for i, logger in enumerate(loggers(config)):
        cls = class_of(str(logger.class_path))
        if cls is not None and issubclass(cls, NAMING_LOGGERS):
            return i
    return None


def naming(config) -> tuple[Path, str, str | None]:
    """The run folder's ``save_dir``, ``name`` and ``version`` (``None``: to be chosen), from the first
    TensorBoard or CSV logger, else from ``trainer.default_root_dir``. A logger's default ``save_dir``
    follows ``trainer.default_root_dir``."""
    root = config.trainer.get("default_root_dir")
    index = naming_logger(config)
    if index is None:
        return Path(root or DEFAULT_SAVE_DIR), DEFAULT_NAME, None
    args = loggers(config)[index].init_args
    save_dir = root if root and str(args.save_dir) == DEFAULT_SAVE_DIR else args.save_dir
    version = args.get("version")
    if version is not None and (str(version) in ("", ".", "..") or "/" in str(version)):
        raise ConfigError(  # the run folder would be save_dir/name itself, above it, or below another
            f"{NAMING_OPTION}={str(version)!r} is not a run's name, which is one folder's: give a name "
            "without '/' (not '', '.' or '..')"
        )
    return Path(save_dir), args.get("name") or "", None if version is None else str(version)


def plan_run(
    subcommand: str,
    config,
    head: str,
    now: str,
    checkpoint_run: Path | None = None,
    checkpoint_step: int = 0,
    checkpoint_name: str = "",
    exists: Callable[[Path], bool] = Path.exists,
) -> Plan:
    """The folder of ``subcommand`` with this parsed ``config`` (of the subcommand), for the head named
    ``head``, at the time ``now`` (``%Y%m%d-%H%M%S``). A checkpoint of a run (``checkpoint_run``, saved at
    ``checkpoint_step`` as ``checkpoint_name``) keeps the command in that run unless another version is
    named: a fit continues it (its ``config.yaml`` stays, this start's config goes beside it), an
    evaluation is filed in ``<run>/<subcommand>/<checkpoint name>`` (numbered when that exists)."""
    save_dir, name, version = naming(config)
    named = None if version is None else (save_dir / name / version).resolve()
    if checkpoint_run is not None and named in (None, checkpoint_run.resolve()):
        run = checkpoint_run.resolve()
        if subcommand == "fit":
            return Plan(run, resume=True, config_file=f"config-resumed-step{checkpoint_step}-{now}.yaml")
        evaluation = free_name(run, f"{subcommand}/{Path(checkpoint_name).stem}", exists=exists)
        return Plan(run / evaluation, filed_in=run)
    if named is None:  # numbered if a command of the same second has it
        suffix = "" if subcommand == "fit" else f"-{subcommand}"
        seed = config.get("seed_everything")
        base = f"{head}-{'unseeded' if seed is False else f'seed{seed}'}-{now}"
        named = (save_dir / name).resolve() / free_name(save_dir / name, base, suffix, exists)
    return Plan(named)


def logged_name(given: str | None, plan: Plan) -> str:
    """A W&B or MLflow run's name: the folder's, or for an evaluation ``<run>/<subcommand>/<checkpoint>``,
    unless one is given. The run's own name, which the run's config records, names none of its
    evaluations: W&B would show them as runs of that name beside it."""
    if plan.filed_in is not None and given in (None, plan.filed_in.name):
        return str(plan.folder.relative_to(plan.filed_in.parent))
    return given or plan.folder.name


def point_loggers(config, plan: Plan, step: int = 0) -> list[tuple[str, str]]:
    """Point every logger of ``config.trainer.logger`` at ``plan.folder``: TensorBoard's and CSV's files
    there (a second one's in ``csv/`` or ``tensorboard/`` inside it), W&B's ``wandb/`` and, unless a
    ``tracking_uri`` names a server, an MLflow store (``mlflow.db``, ``mlartifacts/``) inside it; W&B and
    MLflow runs named after it (W&B's grouped by experiment), a continuation logging into the W&B or
    MLflow run the run started; another logger with a ``save_dir`` or ``log_dir`` option gets the
    folder. Returns the run's files to set aside before the loggers start, as ``(name, new name)``: the
    CSV logger starts ``metrics.csv`` anew (in ``csv/`` too), so a continued run keeps its earlier one as
    ``metrics-before-step<step>.csv``."""
    folder, set_aside, named = plan.folder, [], False
    for logger in loggers(config):
        cls, args = class_of(str(logger.class_path)), logger.init_args
        if cls is not None and issubclass(cls, NAMING_LOGGERS):  # log_dir = save_dir/name/version
            # the first one's files in the folder, another's in a folder of its own kind inside it
            own = folder if not named else folder / cls.__name__.lower().removesuffix("logger")
            args.save_dir, args.name, args.version, named = str(own.parent), "", own.name, True
            if issubclass(cls, CSVLogger):  # it warns of any file there, and deletes metrics.csv
                warnings.filterwarnings(
                    "ignore", message=r"Experiment logs directory .* exists and is not empty"
                )
                if plan.resume:
                    where = own.relative_to(folder)
                    kept = free_name(own, f"metrics-before-step{step}", ".csv")
                    set_aside.append((str(where / "metrics.csv"), str(where / kept)))
        elif cls is not None and issubclass(cls, WandbLogger):  # named as the folder, grouped by experiment
            args.save_dir = str(folder)
            args.name = logged_name(args.get("name"), plan)
            args.group = args.get("group") or (plan.filed_in or folder).parent.name
            if plan.resume and not (args.get("id") or args.get("version")):  # the W&B run it continues
                args.id = wandb_run_id(folder)
            elif plan.filed_in is not None and args.get("id") == wandb_run_id(plan.filed_in):
                args.id = None  # recorded in the run's config: an evaluation is a W&B run of its own
        elif cls is not None and issubclass(cls, MLFlowLogger):
            if run_mlflow_store(args.get("tracking_uri")):  # a store in the run; a server keeps its runs
                args.tracking_uri, args.save_dir = mlflow_store(folder), None  # save_dir: a file store's
                args.artifact_location = str(folder / MLFLOW_ARTIFACTS)
                if plan.resume and not args.get("run_id"):  # the MLflow run it continues
                    args.run_id = mlflow_run_id(folder)
                elif plan.filed_in is not None:  # an evaluation's store is its own
                    args.run_id = None
            args.run_name = logged_name(args.get("run_name"), plan)
        else:
            for key in ("save_dir", "log_dir"):
                if key in args:
                    args[key] = str(folder)
    return set_aside
