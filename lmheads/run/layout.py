"""What a run folder holds, and how to find a run from its files.

``<run>/``: ``config.yaml`` (``config-resumed-step<S>-<time>.yaml`` beside it for each continuation),
``hparams.yaml``, the loggers' files (TensorBoard's events, ``metrics.csv``, ``wandb/``, ``mlflow.db``),
``checkpoints/`` (the best by validation loss, ``last.ckpt``, ``interrupted.ckpt``), ``.lmheads-run`` and
``.lmheads-lock`` (:mod:`lmheads.run.claim`), and once training ends ``results.json`` or
``diverged.json`` (:mod:`lmheads.run.records`). ``validate``, ``test`` and ``predict`` of one of its
checkpoints write into ``<run>/<subcommand>/<checkpoint name>/``, with ``checkpoint.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lmheads.checkpointing import read_checkpoint
from lmheads.errors import ConfigError

RESULTS_FILE = "results.json"
#: Written when the training loss became NaN or infinite: the step, and the message the run ended with.
DIVERGED_FILE = "diverged.json"
#: In an evaluation's folder: the checkpoint it read, the step that checkpoint was saved at (the
#: evaluation's metrics are logged at step 0) and its data options other than the run's.
EVALUATED_FILE = "checkpoint.json"


def checkpoint_file(path: str | Path) -> Path:
    """A checkpoint file, or a run folder's ``checkpoints/last.ckpt``; one line where there is neither."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist; give a checkpoint file or a run folder")
    last = path / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise ConfigError(
            f"{str(path)!r} holds no checkpoints/last.ckpt; give one of its checkpoint files, or a run folder"
        )
    return last


def run_of_checkpoint(ckpt: str | Path) -> Path | None:
    """The run folder a checkpoint file belongs to (``<run>/checkpoints/x.ckpt``, or a SLURM requeue
    checkpoint ``<run>/hpc_ckpt_N.ckpt``), or ``None``."""
    path = Path(ckpt)  # as given: the run's checkpoint callback then sees its folder under the same name
    if len(path.parts) < 4:  # <name>/<version>/checkpoints/<file> at least
        path = path.resolve()
    if path.match(REQUEUE_CHECKPOINTS):
        run = path.parent
    elif path.parent.name == "checkpoints":
        run = path.parent.parent
    else:
        return None
    recorded = any((run / f).is_file() for f in ("hparams.yaml", "config.yaml"))
    return run if recorded else None


#: What Lightning's SLURM auto-requeue saves when it requeues a job (``#SBATCH --signal=SIGUSR1@90``), in
#: the trainer's ``default_root_dir``: for lmheads the run's folder.
REQUEUE_CHECKPOINTS = "hpc_ckpt_*.ckpt"


def wandb_run_id(run: Path) -> str | None:
    """The id of the W&B run that first logged into a run folder (``wandb/[offline-]run-<time>-<id>/``
    holds ``run-<id>.wandb``), or ``None``: a continuation resumes that W&B run rather than starting
    another of the same name."""
    first = sorted(
        (run / "wandb").glob("*run-*_*-*/run-*.wandb"), key=lambda p: p.parent.name.split("run-", 1)[1]
    )
    return first[0].name.removeprefix("run-").removesuffix(".wandb") if first else None


#: MLflow's store in a run folder when no ``tracking_uri`` names a server: a SQLite database (MLflow's file
#: store is deprecated: MLflow 3 refuses it by default) and the artifacts' folder beside it.
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"


def mlflow_store(run: Path) -> str:
    """The ``tracking_uri`` of a run folder's MLflow store."""
    return f"sqlite:///{run / MLFLOW_DB}"


def mlflow_run_id(run: Path) -> str | None:
    """The id of the first MLflow run in a run folder's store, or ``None`` (no store): a continuation
    resumes that MLflow run rather than starting another of the same name."""
    if not (run / MLFLOW_DB).is_file():
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_store(run))
    experiments = [e.experiment_id for e in client.search_experiments()]
    first = client.search_runs(experiments, order_by=["attributes.start_time ASC"], max_results=1)
    return first[0].info.run_id if first else None


def run_checkpoints(run: Path) -> list[Path]:
    """A run's checkpoint files: ``<run>/checkpoints/*.ckpt``, and requeue checkpoints in the run's folder."""
    found = [*(run / "checkpoints").glob("*.ckpt"), *run.glob(REQUEUE_CHECKPOINTS)]
    return sorted(p for p in found if p.is_file())  # a sharded checkpoint is a folder


def furthest_checkpoint(run: Path) -> tuple[int, Path] | None:
    """The furthest state a run's checkpoints hold: the highest global step among
    :func:`run_checkpoints` and its file."""
    furthest: tuple[int, Path] | None = None
    for path in run_checkpoints(run):
        try:
            step = int(read_checkpoint(str(path)).get("global_step", 0))  # memory-mapped: tensors unread
        except ConfigError:  # unreadable: no state to compare
            continue
        if furthest is None or step > furthest[0]:
            furthest = (step, path)
    return furthest


def free_name(folder: Path, base: str, suffix: str = "", exists: Callable[[Path], bool] = Path.exists) -> str:
    """``base + suffix``, or ``base-2 + suffix``, ``base-3 + suffix``, ...: the first not in ``folder``."""
    name, n = base + suffix, 2
    while exists(folder / name):
        name, n = f"{base}-{n}{suffix}", n + 1
    return name
