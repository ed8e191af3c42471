"""Where a command writes (lmheads.run.plan): the plan is a pure function of the command, its config and
its checkpoint; every logger, whichever comes first, is pointed into the plan's folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from jsonargparse import Namespace

from lmheads.cli import main
from lmheads.run.plan import Plan, plan_run, point_loggers

from .helpers import QUICKSTART, ROOT, fit, only_run

NOW = "20261206-120000"


def _logger(class_path: str, **init_args) -> Namespace:
    return Namespace(class_path=class_path, init_args=Namespace(**init_args))


TENSORBOARD = "lightning.pytorch.loggers.TensorBoardLogger"
CSV = "lightning.pytorch.loggers.CSVLogger"
WANDB = "lightning.pytorch.loggers.WandbLogger"
MLFLOW = "lightning.pytorch.loggers.MLFlowLogger"


def _config(logger=None, root=None, seed=3) -> Namespace:
    return Namespace(trainer=Namespace(logger=logger, default_root_dir=root), seed_everything=seed)


def test_a_new_fit_is_named_after_head_seed_and_time_under_its_first_folder_logger(tmp_path):
    tensorboard = _logger(TENSORBOARD, save_dir=str(tmp_path), name="study", version=None)
    for logger in (tensorboard, [_logger(WANDB, save_dir="."), tensorboard]):
        plan = plan_run("fit", _config(logger), "tied", NOW)
        assert plan == Plan(tmp_path.resolve() / "study" / f"tied-seed3-{NOW}")
    named = _logger(TENSORBOARD, save_dir=str(tmp_path), name="study", version="x")
    assert plan_run("test", _config(named), "tied", NOW).folder == tmp_path.resolve() / "study" / "x"
    unnamed = plan_run("validate", _config(tensorboard), "tied", NOW).folder
    assert unnamed.name == f"tied-seed3-{NOW}-validate"
    taken = {tmp_path / "study" / f"tied-seed3-{NOW}"}  # a command of the same second has it
    second = plan_run("fit", _config(tensorboard), "tied", NOW, exists=taken.__contains__)
    assert second.folder.name == f"tied-seed3-{NOW}-2"
    unseeded = plan_run("fit", _config(tensorboard, seed=False), "tied", NOW).folder
    assert unseeded.name == f"tied-unseeded-{NOW}"  # not "seedFalse"


@pytest.mark.parametrize("logger", [False, [_logger(WANDB, save_dir=".")], _logger(MLFLOW)])
def test_without_a_folder_logger_a_run_gets_a_folder_of_its_own(tmp_path, logger):
    """W&B or MLflow alone, or no logger: ``<default_root_dir>/lmheads/<run>``, never a folder runs share."""
    plan = plan_run("fit", _config(logger, root=str(tmp_path)), "untied", NOW)
    assert plan.folder == tmp_path.resolve() / "lmheads" / f"untied-seed3-{NOW}" and not plan.resume
    assert plan_run("fit", _config(logger), "tied", NOW).folder.parent == Path("runs/lmheads").resolve()


def test_a_checkpoint_of_a_run_keeps_the_command_in_that_run(tmp_path):
    run = tmp_path / "study" / "r"
    config = _config(_logger(TENSORBOARD, save_dir=str(tmp_path), name="study", version=None))
    resumed = plan_run("fit", config, "tied", NOW, run, 40, str(run / "checkpoints" / "last.ckpt"))
    assert resumed == Plan(run.resolve(), resume=True, config_file=f"config-resumed-step40-{NOW}.yaml")
    taken = {run.resolve() / "test" / "best", run.resolve() / "test" / "best-2"}
    test = plan_run("test", config, "tied", NOW, run, 40, "best.ckpt", exists=taken.__contains__)
    assert test == Plan(run.resolve() / "test" / "best-3", filed_in=run.resolve())
    # another version named: a new run from that checkpoint
    config.trainer.logger.init_args.version = "other"
    new = plan_run("fit", config, "tied", NOW, run, 40, "last.ckpt")
    assert new == Plan(tmp_path.resolve() / "study" / "other")


def test_every_logger_writes_into_the_folder():
    folder = Path("/runs/study/r")
    loggers = [
        _logger(WANDB, save_dir=".", name=None),
        _logger(TENSORBOARD, save_dir="runs", name="x", version=None),
        _logger(CSV, save_dir="elsewhere", name="y", version=None),
        _logger(MLFLOW, save_dir="./mlruns", tracking_uri=None, run_name=None),
        _logger(MLFLOW, save_dir="./mlruns", tracking_uri="http://server", run_name="mine"),
        _logger("lightning.pytorch.loggers.CometLogger", save_dir=None),
    ]
    evaluation = _logger(WANDB, save_dir=".", name=None)  # of a run's checkpoint: grouped with its run
    point_loggers(_config([evaluation]), Plan(folder / "test" / "last", filed_in=folder))
    assert (evaluation.init_args.name, evaluation.init_args.group) == ("r/test/last", "study")
    assert point_loggers(_config(loggers), Plan(folder)) == []
    wandb, tensorboard, csv, local, server, other = (logger.init_args for logger in loggers)
    assert (wandb.save_dir, wandb.name, wandb.group) == (str(folder), "r", "study")  # grouped by experiment
    assert Path(tensorboard.save_dir, tensorboard.name, tensorboard.version) == folder  # its log_dir
    assert Path(csv.save_dir, csv.name, csv.version) == folder / "csv"  # the second folder logger's
    assert (local.tracking_uri, local.save_dir, local.run_name) == (
        f"sqlite:///{folder / 'mlflow.db'}",
        None,
        "r",
    )
    assert local.artifact_location == str(folder / "mlartifacts")
    assert (server.tracking_uri, server.run_name) == ("http://server", "mine")  # a server keeps its runs
    assert other.save_dir == str(folder)


def test_a_continued_run_logs_into_the_wandb_run_it_started(tmp_path):
    for name, run_id in [
        ("offline-run-20261206_120500-later", "later"),
        ("run-20261206_120000-abc-1", "abc-1"),
    ]:
        (tmp_path / "wandb" / name).mkdir(parents=True)
        (tmp_path / "wandb" / name / f"run-{run_id}.wandb").write_bytes(b"")
    continued, given, new = (_logger(WANDB, save_dir=".", name=None, id=None) for _ in range(3))
    given.init_args.id = "mine"
    point_loggers(_config([continued]), Plan(tmp_path, resume=True))
    point_loggers(_config([given]), Plan(tmp_path, resume=True))
    point_loggers(_config([new]), Plan(tmp_path / "new", resume=True))
    assert (continued.init_args.id, given.init_args.id, new.init_args.id) == ("abc-1", "mine", None)


def test_an_mlflow_store_recorded_in_a_run_moves_with_the_run_and_a_store_elsewhere_stays(tmp_path):
    """A run's saved config records its SQLite store; given to a run in another folder (another version),
    MLflow logs into that folder's. A user's own SQLite file outside a run folder is a store they keep."""
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / ".lmheads-run").write_text("{}")
    recorded = _logger(MLFLOW, tracking_uri=f"sqlite:///{tmp_path / 'old' / 'mlflow.db'}", run_name="old")
    own = _logger(MLFLOW, tracking_uri=f"sqlite:///{tmp_path / 'mine.db'}", run_name=None)
    point_loggers(_config([recorded]), Plan(tmp_path / "new"))
    point_loggers(_config([own]), Plan(tmp_path / "new"))
    assert recorded.init_args.tracking_uri == f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    assert own.init_args.tracking_uri == f"sqlite:///{tmp_path / 'mine.db'}"


def test_an_evaluation_given_its_runs_config_is_a_logger_run_of_its_own(tmp_path):
    """The run's saved configs name its W&B and MLflow runs (and a continuation's, their ids): an
    evaluation of its checkpoint is named after its own folder and starts runs of its own."""
    run = tmp_path / "study" / "r"
    (run / "wandb" / "offline-run-20261206_120000-abc").mkdir(parents=True)
    (run / "wandb" / "offline-run-20261206_120000-abc" / "run-abc.wandb").write_bytes(b"")
    (run / ".lmheads-run").write_text("{}")
    wandb = _logger(WANDB, save_dir=str(run), name="r", id="abc", group="study")
    store = f"sqlite:///{run / 'mlflow.db'}"
    mlflow = _logger(MLFLOW, tracking_uri=store, run_name="r", run_id="0123", artifact_location=None)
    point_loggers(_config([wandb, mlflow]), Plan(run / "validate" / "best", filed_in=run))
    assert (wandb.init_args.name, wandb.init_args.id) == ("r/validate/best", None)
    assert (mlflow.init_args.run_name, mlflow.init_args.run_id) == ("r/validate/best", None)
    assert mlflow.init_args.tracking_uri == f"sqlite:///{run / 'validate' / 'best' / 'mlflow.db'}"


def test_a_continued_csv_run_sets_its_metrics_aside(tmp_path):
    (tmp_path / "metrics.csv").write_text("")
    (tmp_path / "metrics-before-step7.csv").write_text("")
    config = _config(_logger(CSV, save_dir=".", name="", version=None))
    kept = point_loggers(config, Plan(tmp_path, resume=True), 7)
    assert kept == [("metrics.csv", "metrics-before-step7-2.csv")]
    assert point_loggers(config, Plan(tmp_path), 7) == []


@pytest.fixture
def offline_wandb(monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield
    wandb.finish()  # a process's W&B run stays open after a fit: the next test's fit starts its own


def test_wandb_alone_logs_into_the_run_folder(tmp_path, offline_wandb):
    """W&B as the only logger (offline): the run's config, checkpoints, summary and W&B's files in one
    folder, and the run continues there from its checkpoint."""
    wandb = ["--trainer.logger=WandbLogger", "--trainer.logger.project=t", "--trainer.logger.name=null"]
    cli = fit(tmp_path, *wandb, steps=2, every=2)
    assert "anonymous" not in cli.trainer.logger._wandb_init  # W&B warned in every run that it does nothing
    (run,) = (tmp_path / "lmheads").iterdir()
    assert (
        yaml.safe_load((run / "config.yaml").read_text())["trainer"]["logger"]["init_args"]["name"]
        == run.name
    )
    assert {"config.yaml", "checkpoints", "results.json", "wandb"} <= {p.name for p in run.iterdir()}
    assert any((run / "wandb").glob("offline-run-*"))
    pytest.importorskip("wandb").finish()  # as the command's process ends
    fit(tmp_path, *wandb, f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}", steps=3)
    assert [p.name for p in (tmp_path / "lmheads").iterdir()] == [run.name]
    assert len(list(run.glob("config-resumed-step2-*.yaml"))) == 1
    # the continuation logged into the W&B run the fit started, not a second run of the same name
    parts = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(parts) == 2 and len({p.name for p in parts}) == 1, parts


def test_mlflow_alone_logs_into_a_store_in_the_run_folder_and_a_continuation_into_the_same_run(tmp_path):
    """MLflow 3 refuses its file store by default: the run's store is a SQLite file in its folder. The
    continuation logs into the MLflow run the fit started, whose parameters (which MLflow never lets
    change) stay those it started with."""
    pytest.importorskip("sqlalchemy")
    client = pytest.importorskip("mlflow.tracking").MlflowClient
    mlflow = ["--trainer.logger=MLFlowLogger", "--trainer.logger.experiment_name=t"]
    fit(tmp_path, *mlflow, steps=2, every=2)
    (run,) = (tmp_path / "lmheads").iterdir()
    fit(tmp_path, *mlflow, f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}", steps=4, every=2)
    assert {"mlflow.db", "config.yaml", "results.json"} <= {p.name for p in run.iterdir()}
    store = client(f"sqlite:///{run / 'mlflow.db'}")
    (experiment,) = [e.experiment_id for e in store.search_experiments() if e.name == "t"]
    (logged,) = store.search_runs([experiment])
    assert logged.info.run_name == run.name and logged.data.params["max_steps"] == "2"
    assert [m.step for m in store.get_metric_history(logged.info.run_id, "val/loss")][-2:] == [1, 3]
    assert not (tmp_path / "mlruns").exists()


def test_the_wandb_config_adds_wandb_and_the_run_keeps_its_folder(tmp_path, offline_wandb):
    """``configs/loggers/wandb.yaml`` on the quickstart: the quickstart's folder and TensorBoard files, W&B
    beside them in ``wandb/``, its run named after the folder and grouped by the experiment."""
    fit(tmp_path, "--config", str(ROOT / "configs" / "loggers" / "wandb.yaml"), steps=2, every=2)
    run = only_run(tmp_path)  # <save_dir>/quickstart/<run>
    assert any(run.glob("events.out.tfevents.*")) and any((run / "wandb").glob("offline-run-*"))
    tensorboard, wandb = yaml.safe_load((run / "config.yaml").read_text())["trainer"]["logger"]
    assert tensorboard["class_path"].endswith("TensorBoardLogger")
    assert (wandb["init_args"]["name"], wandb["init_args"]["group"]) == (run.name, "quickstart")


def test_naming_options_go_to_the_logger_that_names_the_run(tmp_path, capsys):
    """jsonargparse gives ``--trainer.logger.init_args.*`` to the last logger of a list; the options that
    name the run go to the first TensorBoard or CSV logger, which names it, and the others where
    jsonargparse puts them."""
    csv = tmp_path / "csv.yaml"
    csv.write_text(
        "trainer:\n  logger+:\n    - class_path: lightning.pytorch.loggers.CSVLogger\n"
        "      init_args:\n        save_dir: elsewhere\n"
    )
    naming = ["--trainer.logger.init_args.version", "v1", "--trainer.logger.init_args.save_dir=there"]
    with pytest.raises(SystemExit):
        main(["fit", "--config", QUICKSTART, "--config", str(csv), *naming,
              "--trainer.logger.init_args.flush_logs_every_n_steps=7", "--print_config"])  # fmt: skip
    loggers = yaml.safe_load(capsys.readouterr().out)["trainer"]["logger"]
    tensorboard, csv_logger = (logger["init_args"] for logger in loggers)
    assert [tensorboard[k] for k in ("save_dir", "name", "version")] == ["there", "quickstart", "v1"]
    flush = "flush_logs_every_n_steps"
    assert [csv_logger[k] for k in ("save_dir", "version", flush)] == ["elsewhere", None, 7]
    # a logger added on the command line that cannot parse without the option: the option stays its own
    with pytest.raises(SystemExit):
        main(["fit", "--config", QUICKSTART, "--trainer.logger+=CSVLogger",
              "--trainer.logger.init_args.save_dir=x", "--print_config"])  # fmt: skip
    loggers = yaml.safe_load(capsys.readouterr().out)["trainer"]["logger"]
    assert [logger["init_args"]["save_dir"] for logger in loggers] == ["runs", "x"]
