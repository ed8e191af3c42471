"""Shared by the CLI tests: quick runs of the real CLI and reading their TensorBoard events."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lmheads.cli import main
from lmheads.run.claim import CLAIM_FILE, LOCK_FILE

__all__ = ["QUICKSTART", "ROOT", "fit", "main", "only_run", "quick_args", "run_lmheads", "scalars", "tool"]
__all__ += ["held_elsewhere", "two_loggers"]

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


# Each command gets a process of its own, forked from a server process that imported lmheads (and with it
# torch and Lightning) once: a new process costs a fraction of a second instead of the seconds of imports.
_FORKSERVER = multiprocessing.get_context("forkserver")
_FORKSERVER.set_forkserver_preload(["lmheads.cli", "lmheads.console"])


def _as_the_module(args: list[str], cwd: str, env: dict[str, str], stdout: str, stderr: str) -> None:
    """In the new process: ``python -m lmheads ARGS`` (``lmheads/__main__.py`` run as ``__main__``), its
    output going to two files."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, stdout), (2, stderr)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = ["-m", *args]  # run_module puts the module's file first, as python -m does
    runpy.run_module("lmheads", run_name="__main__", alter_sys=True)


def run_lmheads(*args: str, cwd: Path, new_python: bool = False) -> subprocess.CompletedProcess:
    """``python -m lmheads ARGS`` in a new process that starts in ``cwd``: its exit status and what it
    printed. The process is forked from a server that imported lmheads once; Lightning's DDP launcher
    starts the other ranks as ``python -m lmheads.__main__ ARGS``, as it does for a user's command. With
    ``new_python`` the command is a new Python, as a user starts it: for tests of all that a command
    prints (what importing the packages prints, the server printed)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # where every process of the command finds tests.probes
    if new_python:
        command = [sys.executable, "-m", "lmheads", *args]
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    with tempfile.TemporaryDirectory() as scratch:
        out, err = Path(scratch, "stdout"), Path(scratch, "stderr")
        process = _FORKSERVER.Process(
            target=_as_the_module, args=(list(args), str(cwd), env, str(out), str(err))
        )
        process.start()
        process.join(300)
        if process.exitcode is None:  # ended as a timed-out subprocess would be: killed
            process.kill()
            process.join()
        return subprocess.CompletedProcess(
            ["python", "-m", "lmheads", *args], process.exitcode, out.read_text(), err.read_text()
        )


def two_loggers(folder: Path, version: str | None = None) -> str:
    """A config file giving TensorBoard and CSV loggers, both under ``folder``; its path."""
    path = folder / "two-loggers.yaml"
    tensorboard = {"save_dir": str(folder), "name": "quickstart", "default_hp_metric": False}
    if version is not None:
        tensorboard["version"] = version
    loggers = [
        {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": tensorboard},
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(folder / "csv")}},
    ]
    path.write_text(json.dumps({"trainer": {"logger": loggers}}))  # JSON is YAML
    return str(path)


#: The environment of one SLURM task (srun), as Lightning detects it: its auto-requeue handler on SIGUSR1.
SLURM = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0",
         "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}  # fmt: skip


def quick_args(save_dir: Path, steps: int = 6, every: int = 3) -> list[str]:
    """The quickstart shrunk to a few steps and a small validation set."""
    return [
        "--config", QUICKSTART,
        f"--trainer.logger.init_args.save_dir={save_dir}",
        f"--trainer.default_root_dir={save_dir}",
        f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={every}",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--data.init_args.train_tokens=65536",
        "--data.init_args.val_tokens=4096",
        "--sampling.validation_samples=0",  # 0.3 s a validation; the tests of samples ask for them
        "--model.backbone.n_layer=1",  # a tenth of the quickstart's compute: the tests need its steps only
        "--model.backbone.d_model=32",
    ]  # fmt: skip


def fit(save_dir: Path, *extra: str, steps: int = 6, every: int = 3):
    return main(["fit", *quick_args(save_dir, steps, every), *extra])


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def only_run(save_dir: Path) -> Path:
    runs = [p for p in (save_dir / "quickstart").iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def tool(name: str):
    """``tools/<name>.py`` imported as a module, as its script runs: with its folder on the import path,
    where it finds the sibling tools it imports."""
    if str(ROOT / "tools") not in sys.path:
        sys.path.insert(0, str(ROOT / "tools"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def held_elsewhere(run: Path, **claim):
    """Another live process that holds the run folder's lock, as a command writing into it does, with a
    claim file naming it (``claim``: its host and start time); yields that process."""
    code = (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.lockf(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(run / LOCK_FILE)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "held"
        (run / CLAIM_FILE).write_text(json.dumps({"pid": process.pid, **claim}))
        yield process
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
