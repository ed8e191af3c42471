"""Which logger's folder is a run's: Lightning writes the config and checkpoints into the first logger's
``save_dir/name/version``. lmheads holds TensorBoard's and CSV's folders as runs (:mod:`lmheads.runs`) and
refuses another first logger, whose runs would share one folder.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from lmheads.dotted import class_of
from lmheads.errors import ConfigError
from lmheads.runs import RunFolder, free_name

#: The TensorBoard logger's folder unless set otherwise; ``trainer.default_root_dir`` replaces it.
DEFAULT_SAVE_DIR = "runs"

#: Loggers that write into ``save_dir/name/version``, the folder where Lightning then puts the config and
#: checkpoints: lmheads keeps run folders for them.
FOLDER_LOGGERS = (TensorBoardLogger, CSVLogger)


def folder_logger_args(config):
    """The first logger's ``init_args`` (its ``save_dir`` following ``trainer.default_root_dir``), or
    ``None`` without one (``false``; or ``null``, Lightning's default, which numbers its folders). Of
    several loggers the first counts: Lightning writes the config and checkpoints into its folder. A
    first logger of another kind is refused: Lightning would put each run's config into its ``save_dir``,
    which every run shares, over the last run's."""
    logger = _first_logger(config)
    if not hasattr(logger, "init_args"):
        return None
    cls = class_of(str(logger.get("class_path")))
    if cls is None or not issubclass(cls, FOLDER_LOGGERS):
        raise ConfigError(
            f"trainer.logger: the first logger ({logger.get('class_path')}) has no folder of its own for a "
            "run's config and checkpoints, which every run would share; give "
            "lightning.pytorch.loggers.TensorBoardLogger (or CSVLogger) first in trainer.logger, in a "
            "config file, and the others after it"
        )
    args = logger.init_args
    root = config.trainer.get("default_root_dir")
    if root and str(args.save_dir) == DEFAULT_SAVE_DIR:  # logs follow default_root_dir
        args.save_dir = str(root)
    return args


def _first_logger(config):
    logger = config.trainer.get("logger")
    return logger[0] if isinstance(logger, list) and logger else logger


def start_csv_logger(folder: RunFolder, config, resume_step: int | None) -> None:
    """Lightning's CSV logger deletes the ``metrics.csv`` of a folder it starts in, and warns so whenever
    the folder has files. With a CSV logger first, a run continued from step ``resume_step`` keeps its
    earlier metrics as ``metrics-before-step<step>.csv`` (numbered if continued from that step before).
    The logger's warning about the run's own folder goes: that folder holds lmheads' claim before the
    logger starts in it."""
    if not issubclass(class_of(str(_first_logger(config).get("class_path"))), CSVLogger):
        return
    tail = re.escape(os.path.join(folder.path.parent.name, folder.path.name))
    warnings.filterwarnings("ignore", message=rf"Experiment logs directory .*{tail} exists and is not empty")
    if resume_step is None:
        return
    kept = free_name(folder.path, f"metrics-before-step{resume_step}", ".csv")
    if folder.set_aside("metrics.csv", kept):
        rank_zero_info(
            f"the CSV logger starts metrics.csv anew: the run's metrics before step {resume_step} are kept "
            f"in {kept}"
        )


def named_run_folder(args) -> Path | None:
    """The run folder the logger's arguments name (``save_dir/name/version``), or ``None``
    when they leave the version to be chosen."""
    version = args.get("version")
    return None if version is None else Path(args.save_dir, args.name or "", str(version))
