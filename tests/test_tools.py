"""tools/sweep.py and tools/compare.py on tiny quickstart runs."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmheads import comparable, dotted, runlog, stats
from lmheads.run.claim import CLAIM_FILE, LOCK_FILE

from .helpers import QUICKSTART, ROOT, fit, held_elsewhere, only_run, scalars, tool, two_loggers

sweep, compare = tool("sweep"), tool("compare")

TINY = [
    "--trainer.val_check_interval=2",
    "--trainer.log_every_n_steps=1",
    "--data.init_args.train_tokens=65536",
    "--data.init_args.val_tokens=4096",
    "--sampling.validation_samples=0",
]


def run_sweep(root, steps: int, *extra: str) -> int:
    args = [
        "--config",
        str(ROOT / "configs/quickstart.yaml"),
        "--heads",
        "tied",
        "untied",
        "--seeds",
        "0",
        "1",
    ]
    return sweep.main(
        [*args, "--root", str(root), "--name", "grid", *extra, "--", f"--trainer.max_steps={steps}", *TINY]
    )


@pytest.mark.slow
def test_sweep_is_resumable_and_compare_tabulates(tmp_path, capsys):
    assert run_sweep(tmp_path, 2) == 0
    grid = tmp_path / "grid"
    assert sorted(p.name for p in grid.iterdir()) == [
        "tied-seed0",
        "tied-seed1",
        "untied-seed0",
        "untied-seed1",
    ]
    # a second call skips finished runs
    capsys.readouterr()
    assert run_sweep(tmp_path, 2) == 0
    assert capsys.readouterr().out.count("skipped (done)") == 4
    # an interrupted run (no marker) resumes from its last checkpoint, in the same run folder; the finished
    # runs, asked for 4 steps now, are refused, not skipped as if they were those runs
    (grid / "tied-seed0" / "sweep.json").unlink()
    assert run_sweep(tmp_path, 4) == 1
    assert capsys.readouterr().out.count("(--trainer.max_steps=2 then; --trainer.max_steps=4 now)") == 3
    record = json.loads((grid / "tied-seed0" / "sweep.json").read_text())
    assert any(arg.startswith("--ckpt_path=") for arg in record["command"])
    resumed = grid / "tied-seed0"
    assert len(list(resumed.glob("events.out.tfevents.*"))) == 2
    steps = [s for s, _ in scalars(resumed)["train/loss"]]
    assert max(steps) == 3

    runs = runlog.find_runs([grid])
    run = next(r for r in runs if r.path == resumed)
    assert [s for s, _, _ in run.series("val/loss")] == [1, 3]  # both sessions, stitched
    minutes = [t for _, _, t in run.series("val/loss")]
    assert minutes == sorted(minutes)

    out = tmp_path / "report"
    doc = tmp_path / "results.md"
    doc.write_text(f"# Results\n\n{compare.BEGIN}\nold\n{compare.END}\n\nkept\n")
    before = doc.read_text()
    # tied seed 0 now ends at step 4, seed 1 at step 2: no mean of the two is of one budget
    capsys.readouterr()
    assert compare.main([str(grid), "--out", str(out), "--update", str(doc)]) == 2
    err = capsys.readouterr().err
    assert "the runs of tied were last validated after 4 steps (tied seed 0), 2 steps (tied seed 1)" in err
    assert doc.read_text() == before and not out.exists()
    shutil.move(grid / "tied-seed1", tmp_path / "tied-seed1")
    assert compare.main([str(grid), "--out", str(out), "--update", str(doc)]) == 0
    text = doc.read_text()
    assert "old" not in text and text.endswith("kept\n")
    assert "WARNING: runs differ in budget" in text  # tied-seed0 trained 4 steps, the untied runs 2
    rows = [line for line in text.splitlines() if line.startswith("| tied") or line.startswith("| untied")]
    assert len(rows) == 2 and "| tied | 0 |" in rows[0] and "| untied | 0,1 |" in rows[1]
    final = [r.final("val/loss") for r in runs if r.hparams["head"] == "untied"]
    mean = sum(final) / 2
    assert f"{mean:.4f} ± " in rows[1]
    assert f"{math.exp(final[0]) / 2 + math.exp(final[1]) / 2:.2f}" in rows[1]
    for name in ("val_loss_vs_step.png", "val_loss_vs_tokens.png", "val_loss_vs_minutes.png"):
        assert (out / name).stat().st_size > 1000
        assert f"report/{name}" in text

    # A second, named section of the same document, grouped by one more hyperparameter.
    begin, end = tool("report").markers("by_size")
    doc.write_text(text + f"\n{begin}\n{end}\n")
    assert compare.main([str(grid), "--update", str(doc), "--section", "by_size", "--by", "batch_size"]) == 0
    named = doc.read_text().split(begin)[1]
    assert "| tied, batch_size=32 | 0 |" in named and "| untied, batch_size=32 | 0,1 |" in named
    assert doc.read_text().split(begin)[0] == text + "\n"  # the first section is untouched


@pytest.mark.slow
def test_a_run_there_with_other_options_is_refused_not_skipped(tmp_path, capsys):
    """A finished run is skipped only when this call asks for the same run: other options, or an edited
    config file, leave it as it was and fail the sweep, naming what differs."""
    config = tmp_path / "quickstart.yaml"
    config.write_text((ROOT / "configs/quickstart.yaml").read_text())

    def call(*extra: str) -> tuple[int, str]:
        args = ["--config", str(config), "--heads", "tied", "--seeds", "0", "--root", str(tmp_path)]
        code = sweep.main([*args, "--name", "grid", "--", *TINY, *extra])
        printed = capsys.readouterr()
        return code, printed.out + printed.err

    assert call("--trainer.max_steps=2")[0] == 0
    run = tmp_path / "grid" / "tied-seed0"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert call("--trainer.max_steps=2")[1].count("skipped (done)") == 1
    config.write_text(config.read_text() + "# a comment changes nothing\n")
    assert call("--trainer.max_steps=2")[1].count("skipped (done)") == 1
    code, out = call("--trainer.max_steps=4")
    assert code == 1 and "refused: " in out
    assert "(--trainer.max_steps=2 then; --trainer.max_steps=4 now)" in out
    config.write_text(config.read_text().replace("lr: 3.0e-3", "lr: 1.0e-3"))
    code, out = call("--trainer.max_steps=2")
    assert code == 1 and f"({config} edited since)" in out
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    (run / "sweep.json").write_text('{"status": "do')  # a copy cut short: neither skipped nor trained again
    before[run / "sweep.json"] = (run / "sweep.json").read_bytes()
    code, out = call("--trainer.max_steps=2")
    assert code == 1 and f"refused: {run / 'sweep.json'} cannot be read (Unterminated string" in out
    assert "error: 1 run(s) refused, as each one's line says" in out
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_a_diverged_run_is_a_result_the_next_call_leaves_alone(tmp_path, capsys, monkeypatch):
    """A run whose loss became NaN is recorded as diverged, not as a failure to retry: the same sweep
    again would train it from its last good checkpoint into the same divergence."""
    monkeypatch.chdir(ROOT)  # where each run finds tests.probes

    def call() -> tuple[int, str]:
        args = ["--config", str(ROOT / "configs/quickstart.yaml"), "--heads", "tied", "--seeds", "0"]
        poison = ["--trainer.callbacks+=tests.probes.PoisonAt", "--trainer.callbacks.step=3"]
        code = sweep.main(
            [*args, "--root", str(tmp_path), "--name", "grid", "--", *TINY, "--trainer.max_steps=6", *poison]
        )
        return code, capsys.readouterr().out

    code, out = call()
    assert code == 0 and "tied-seed0: diverged (at step 3, after " in out
    run = tmp_path / "grid" / "tied-seed0"
    assert json.loads((run / "sweep.json").read_text())["status"] == "diverged"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, out = call()
    assert code == 0 and "tied-seed0: skipped (diverged at step 3; move the run away" in out
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_run_another_process_trains_is_left_to_it(tmp_path, capsys, monkeypatch):
    """Two sweeps of one root at once (the same command started twice): a run the other one trains now is
    not started again, and a failure of one that the other started at the same moment (its folder was
    refused) does not replace the other's record of it."""
    run = tmp_path / "grid" / "tied-seed0"
    run.mkdir(parents=True)
    args = ["--config", str(ROOT / "configs/quickstart.yaml"), "--heads", "tied", "--seeds", "0"]
    with held_elsewhere(run, host=socket.gethostname(), started="now") as other:
        assert sweep.main([*args, "--root", str(tmp_path), "--name", "grid"]) == 1
        busy = f"tied-seed0: busy (process {other.pid} on {socket.gethostname()}, started now, trains it now)"
        assert busy in capsys.readouterr().out
        assert {p.name for p in run.iterdir()} == {CLAIM_FILE, LOCK_FILE}  # no sweep.json, no log
    (run / CLAIM_FILE).unlink()
    (run / LOCK_FILE).unlink()

    def refused_while_the_other_finished(self, cmd, **kwargs):
        (run / "sweep.json").write_text(json.dumps({"status": "done", "command": cmd}))
        return 2  # this start was refused: the other process had claimed the folder

    monkeypatch.setattr(sweep.Runs, "run", refused_while_the_other_finished)
    assert sweep.main([*args, "--root", str(tmp_path), "--name", "grid"]) == 1
    assert "tied-seed0: busy (another process trains it or has recorded it" in capsys.readouterr().out
    assert json.loads((run / "sweep.json").read_text())["status"] == "done"


def test_a_sweep_names_its_runs_whatever_loggers_follow_the_first(tmp_path, monkeypatch, capsys):
    """A config that adds a logger after the TensorBoard one (as configs/loggers/wandb.yaml does): the
    runs are in the sweep's folders all the same. One that trained elsewhere even so (its config has no
    TensorBoard or CSV logger to name it) is a failure that says where, not a run done."""
    monkeypatch.chdir(tmp_path)
    csv = tmp_path / "csv.yaml"
    csv.write_text(
        "trainer:\n  logger+:\n    - class_path: lightning.pytorch.loggers.CSVLogger\n"
        "      init_args:\n        save_dir: runs\n"
    )
    args = ["--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(csv), "--heads", "tied"]
    args += ["--root", str(tmp_path / "sweeps"), "--name", "grid"]
    assert sweep.main([*args, "--seeds", "0", "--", "--trainer.max_steps=2", *TINY]) == 0
    run = tmp_path / "sweeps" / "grid" / "tied-seed0"
    assert (run / "results.json").is_file() and (run / "csv" / "metrics.csv").is_file()
    assert not (tmp_path / "runs").exists()

    def trained_elsewhere(self, cmd, stdout, **kwargs):
        stdout.write("run: /elsewhere/lmheads/tied-seed1-20261206-120000\n")
        return 0

    monkeypatch.setattr(sweep.Runs, "run", trained_elsewhere)
    capsys.readouterr()
    assert sweep.main([*args, "--seeds", "1"]) == 1
    out = capsys.readouterr().out
    assert "tied-seed1: failed (exit 0, but it trained outside" in out
    assert "(run: /elsewhere/lmheads/tied-seed1-20261206-120000)" in out
    record = json.loads((tmp_path / "sweeps" / "grid" / "tied-seed1" / "sweep.json").read_text())
    assert record["status"] == "failed"  # the next call tries it again


def test_grid_and_run_names():
    grid = sweep.parse_grid(["model.backbone.d_model=64,128", "model.lr=1e-3"])
    assert grid == [
        {"model.backbone.d_model": "64", "model.lr": "1e-3"},
        {"model.backbone.d_model": "128", "model.lr": "1e-3"},
    ]
    assert sweep.Run("tied", 2, grid[1]).name == "tied-seed2-d_model=128-lr=1e-3"
    # a grid over files names each run by one folder, not a path of folders
    files = sweep.parse_grid(["data.init_args.train_file=/data/a/train.txt,b/train.txt"])
    names = [sweep.Run("tied", 0, f).name for f in files]
    assert names == ["tied-seed0-train_file=_data_a_train.txt", "tied-seed0-train_file=b_train.txt"]
    # a list is one value: commas inside brackets do not split it
    betas = sweep.parse_grid(["model.betas=[0.9,0.95],[0.9, 0.99]"])
    assert betas == [{"model.betas": "[0.9,0.95]"}, {"model.betas": "[0.9, 0.99]"}]
    for item in ("model.lr", "model.lr=1e-3,", "model.lr=,1e-3"):
        with pytest.raises(SystemExit, match="--grid expects KEY=V1,V2"):
            sweep.parse_grid([item])
    # a run's own value is given last: it trains what its name says, whatever every run is also given
    args = argparse.Namespace(config=["c.yaml"], root="runs", name="grid", extra=["--model.lr=5e-3"])
    cmd = sweep.command(sweep.Run("tied", 2, grid[1]), args, Path("nowhere"))
    assert [a for a in cmd if a.startswith("--model.lr=")][-1] == "--model.lr=1e-3"
    matched = ["--config", QUICKSTART, "--heads", "tied", "--name", "m", "--match-params"]
    matched += ["--grid", "model.backbone.d_model=64"]
    with pytest.raises(SystemExit, match=r"--match-params sets model\.backbone\.d_model itself"):
        sweep.main(matched)


@pytest.mark.slow
def test_sigterm_to_a_sweep_stops_its_runs_with_a_checkpoint_and_the_next_call_resumes(tmp_path):
    import signal
    import subprocess

    import torch

    def sweep_command(steps: int) -> list[str]:
        return [
            sys.executable, str(ROOT / "tools/sweep.py"), "--config", str(ROOT / "configs/quickstart.yaml"),
            "--heads", "tied", "untied", "--seeds", "0", "--root", str(tmp_path), "--name", "grid", "--",
            f"--trainer.max_steps={steps}", "--trainer.val_check_interval=4", *TINY[1:],
            "--trainer.callbacks+=tests.probes.WaitForSignal", "--trainer.callbacks.step=4",
            "--trainer.callbacks.head=tied",
        ]  # fmt: skip

    steps = 8  # the tied run waits for the signal after its first validation (step 4)
    sweep_process = subprocess.Popen(sweep_command(steps), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    first_checkpoint = tmp_path / "grid" / "tied-seed0" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not first_checkpoint.is_file() and time.time() < deadline:
        time.sleep(0.2)
    sweep_process.send_signal(signal.SIGTERM)
    out, _ = sweep_process.communicate(timeout=120)
    assert sweep_process.returncode == 128 + signal.SIGTERM, out
    assert "tied-seed0: interrupted" in out and "untied-seed0: not started" in out
    assert not (tmp_path / "grid" / "untied-seed0").exists()
    ckpt = tmp_path / "grid" / "tied-seed0" / "checkpoints" / "interrupted.ckpt"
    stopped_at = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
    assert 4 <= stopped_at < steps
    assert json.loads((ckpt.parents[1] / "sweep.json").read_text())["status"] == "interrupted"
    # the same sweep again: the interrupted run continues from its checkpoint, the other starts
    again = subprocess.run(sweep_command(steps), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    record = json.loads((ckpt.parents[1] / "sweep.json").read_text())
    assert record["status"] == "done" and f"--ckpt_path={ckpt}" in record["command"]
    logged = [s for s, _ in scalars(ckpt.parents[1])["train/loss"]]
    assert logged[-1] == steps - 1 and stopped_at in logged  # both sessions of the one run


def test_a_sweep_whose_reader_has_gone_carries_on(tmp_path):
    """`sweep.py ... | head`: the reader of its output goes first. The sweep goes on without a traceback
    and with its own exit status (here a dry run's, 0), as it would go on stopping and saving its runs
    after `| tee log` and Ctrl-C."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tools/sweep.py"), "--config", str(QUICKSTART), "--heads", "tied",
         "untied", "--seeds", "0", "1", "2", "--root", str(tmp_path), "--name", "grid", "--dry-run"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    process.stdout.close()  # the reader of stdout is gone from the start
    err = process.stderr.read()
    assert process.wait(timeout=120) == 0 and "Error" not in err, err
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_sweep_resumes_from_the_furthest_checkpoint(tmp_path):
    import argparse
    import os

    import torch

    args = argparse.Namespace(config=["c.yaml"], root=str(tmp_path), name="grid", extra=[])
    run = sweep.Run("tied", 0)
    folder = tmp_path / "grid" / run.name / "checkpoints"
    assert not any(a.startswith("--ckpt_path") for a in sweep.command(run, args, folder.parent))
    folder.mkdir(parents=True)

    def save(path, step):
        torch.save({"state_dict": {}, "global_step": step}, path)

    last, interrupted, requeued = (
        folder / "last.ckpt",
        folder / "interrupted.ckpt",
        folder.parent / "hpc_ckpt_1.ckpt",
    )
    save(last, 20)
    assert f"--ckpt_path={last}" in sweep.command(run, args, folder.parent)
    save(interrupted, 27)  # interrupted after the last validation
    assert f"--ckpt_path={interrupted}" in sweep.command(run, args, folder.parent)
    save(interrupted, 12)  # a stale interruption from before a later validation, written last
    os.utime(last, (0, 0))
    assert f"--ckpt_path={last}" in sweep.command(run, args, folder.parent)
    save(requeued, 25)  # Lightning's SLURM requeue checkpoint, in the run's folder
    assert f"--ckpt_path={requeued}" in sweep.command(run, args, folder.parent)


@pytest.mark.parametrize(
    ("config", "head", "message"),
    [
        ("configs/quickstart.yaml", "tide", "error: unknown head 'tide'; registered heads:"),
        ("configs/quickstart.yaml", "mine.Head", "error: head class 'mine.Head' cannot be imported"),
        ("configs/missing.yaml", "tied", "error: config file "),
    ],
)
def test_sweep_refuses_bad_input_before_any_run(tmp_path, config, head, message):
    args = ["--config", str(ROOT / config), "--heads", "tied", head, "--seeds", "0"]
    with pytest.raises(SystemExit) as stop:
        sweep.main([*args, "--root", str(tmp_path / "runs"), "--name", "bad"])
    assert str(stop.value).startswith(message)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--heads", "tied", "TiedHead"], "error: --heads names TiedHead a second time"),
        (["--heads", "tied", "--seeds", "0", "1", "0"], "error: --seeds names 0 a second time"),
        (["--heads", "tied", "--grid", "model.lr=1e-3", "model.lr=2e-3"], "error: --grid names model.lr a"),
        (["--heads", "tied", "--grid", "model.lr=1e-3,1e-3"], "error: --grid model.lr=1e-3,1e-3 repeats"),
        # each would train runs other than their folders' names say (untied runs named tied, seeds 0-2
        # all of seed 5), or write them elsewhere
        (["--heads", "tied", "--grid", "model.head=untied"], "error: the sweep sets model.head for each"),
        (["--heads", "tied", "--", "--seed_everything=5"], "error: the sweep sets seed_everything for"),
        (["--heads", "tied", "--", "--config", str(ROOT / "configs/heads/untied.yaml")], "sets model.head"),
        (["--heads", "tied", "--", "--trainer.logger.init_args.version=x"], "sets trainer.logger.version"),
        (["--heads", "tied", "--", "--ckpt_path=x"], "sets ckpt_path for each run"),
        (["--heads", "tied", "--gpus", "0,"], "error: --gpus '0,' has an empty GPU id"),
        (["--heads", "tied", "--gpus", ""], "error: --gpus '' has an empty GPU id"),
    ],
)
def test_sweep_refuses_runs_asked_for_twice_or_named_for_what_they_do_not_train(tmp_path, options, message):
    args = [
        "--config",
        str(ROOT / "configs/quickstart.yaml"),
        "--root",
        str(tmp_path / "runs"),
        "--name",
        "x",
    ]
    with pytest.raises(SystemExit) as stop:
        sweep.main([*args, *options])
    assert message in str(stop.value)
    assert not (tmp_path / "runs").exists()


def test_sweep_refuses_a_root_with_a_file_in_its_path_before_any_run(tmp_path):
    (tmp_path / "a file").write_text("")
    root = tmp_path / "a file" / "runs"
    config = str(ROOT / "configs/quickstart.yaml")
    with pytest.raises(SystemExit) as stop:
        sweep.main(["--config", config, "--heads", "tied", "--root", str(root), "--name", "x"])
    assert f"error: --root {root} cannot be made: {tmp_path / 'a file'} is a file" in str(stop.value)


def test_sweep_refuses_a_root_it_cannot_write_before_any_run(tmp_path, monkeypatch):
    """A read-only root was a traceback from the first run's folder."""

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(sweep.tempfile, "TemporaryFile", read_only)
    args = ["--config", QUICKSTART, "--heads", "tied", "--root", str(tmp_path), "--name", "x"]
    with pytest.raises(SystemExit) as stop:
        sweep.main(args)
    assert str(stop.value) == (
        f"error: --root: {tmp_path / 'x'} cannot be written (Read-only file system); make it writable, or "
        "give another --root"
    )
    assert sweep.main([*args, "--dry-run"]) == 0  # which writes nothing


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ("model.betas=[0.9,0.95", "error: invalid value '[0.9,0.95' for --model.betas: expected tuple (run "),
        ("model.lrr=0.1", "error: unknown option --model.lrr; did you mean --model.lr? (run "),
    ],
)
def test_sweep_refuses_options_lmheads_refuses_before_any_run(tmp_path, grid, message):
    """Each run's options are parsed as the run would parse them before the first run starts: a bad grid
    key or value is lmheads' own error line, and no folder is made."""
    args = ["--config", QUICKSTART, "--heads", "tied", "untied", "--seeds", "0", "1", "--grid", grid]
    with pytest.raises(SystemExit) as stop:
        sweep.main([*args, "--root", str(tmp_path / "runs"), "--name", "x"])
    assert str(stop.value).startswith(message) and str(stop.value).endswith("; no run was started)")
    assert not (tmp_path / "runs").exists()


def test_a_run_that_fails_to_start_says_why_and_leaves_no_folder(tmp_path, capsys):
    args = ["--config", QUICKSTART, "--heads", "tied", "--seeds", "0", "--root", str(tmp_path / "runs")]
    assert sweep.main([*args, "--name", "x", "--", "--trainer.max_epochs=0"]) == 1
    out = capsys.readouterr().out
    assert "tied-seed0: failed before training (exit 2): error: trainer.max_epochs=0 trains nothing" in out
    assert not (tmp_path / "runs").exists()


def test_a_failed_run_says_why_this_attempt_failed(tmp_path, capsys, monkeypatch):
    """A run's sweep.log keeps every attempt's output: the line of a run that failed again was the first
    attempt's error, whatever the second one's was (a full disk, then a refusal)."""
    reasons = iter(["the disk filled", "the folder is claimed"])

    def fails(self, cmd, stdout, **kwargs):
        run_dir = Path(stdout.name).parent
        (run_dir / "config.yaml").write_text("started\n")  # it started: its folder stays
        stdout.write(f"some output\nerror: {next(reasons)}\n")
        return 2

    monkeypatch.setattr(sweep.Runs, "run", fails)
    args = ["--config", QUICKSTART, "--heads", "tied", "--seeds", "0", "--root", str(tmp_path), "--name", "x"]
    for reason in ("the disk filled", "the folder is claimed"):
        assert sweep.main(args) == 1
        assert f"tied-seed0: failed (exit 2: error: {reason}; see" in capsys.readouterr().out


def test_sweep_takes_head_options_in_its_grid(tmp_path, capsys):
    grid = ["--grid", "model.head.init_args.bias=true,false", "--dry-run", "--", "--model.lr=0.01"]
    args = ["--config", str(ROOT / "configs/quickstart.yaml"), "--heads", "untied", "--seeds", "0"]
    assert sweep.main([*args, "--root", str(tmp_path / "runs"), "--name", "x", *grid]) == 0
    out = capsys.readouterr().out
    assert "untied-seed0-bias=true: " in out and "untied-seed0-bias=false: " in out


def test_sweep_refuses_a_list_of_loggers(tmp_path):
    """The sweep names its runs with ``--trainer.logger.init_args.*``, which a list gives its last logger."""
    args = ["--config", QUICKSTART, "--config", two_loggers(tmp_path), "--heads", "tied", "--seeds", "0"]
    with pytest.raises(SystemExit) as stop:
        sweep.main([*args, "--root", str(tmp_path / "runs"), "--name", "bad"])
    assert "which go to the last logger of a list" in str(stop.value)
    assert not (tmp_path / "runs").exists()


def test_compare_without_runs_fails_clearly(tmp_path, capsys):
    assert compare.main([str(tmp_path)]) == 2
    assert "no lmheads runs" in capsys.readouterr().err
    missing = (
        f"error: {tmp_path / 'typo'}: no such folder; give folders that hold runs (e.g. runs/quickstart)\n"
    )
    for report in (compare, tool("buckets"), tool("data_regime")):  # a folder that is not there is named
        assert report.main([str(tmp_path), str(tmp_path / "typo")]) == 2
        assert capsys.readouterr().err == missing


def test_one_head_given_two_ways_is_one_configuration(tmp_path, capsys):
    """The README's flow: the quickstart's ``head: TiedHead`` and ``--model.head=tied`` record one head
    under one name, so their runs are two seeds of one row."""
    fit(tmp_path, "--seed_everything=1", steps=2, every=2)
    fit(tmp_path, "--model.head=tied", "--seed_everything=2", steps=2, every=2)
    assert compare.main([str(tmp_path)]) == 0, capsys.readouterr().err
    assert "| tied | 1,2 |" in capsys.readouterr().out


def test_runs_validated_on_other_text_are_not_seeds(tmp_path, capsys):
    """Two runs whose validation files have one name and size but other text (each line's words reversed)
    are told apart by what the files hold, not averaged as seeds."""
    lines = [" ".join(f"w{(i * 7 + j) % 40}" for j in range(6)) for i in range(300)]
    train = tmp_path / "train.txt"
    train.write_text("\n".join(lines) + "\n")
    for seed, text in enumerate([lines[:50], [" ".join(reversed(line.split())) for line in lines[:50]]]):
        valid = tmp_path / f"v{seed}" / "valid.txt"
        valid.parent.mkdir()
        valid.write_text("\n".join(text) + "\n")
        data = ["--data=lmheads.data.TextDataModule", f"--data.train_file={train}", "--data.tokenizer=word"]
        data += [f"--data.validation_file={valid}", "--data.batch_size=4", "--model.backbone.block_size=16"]
        fit(tmp_path / "runs", *data, f"--seed_everything={seed}", steps=2, every=2)
    assert (tmp_path / "v0" / "valid.txt").stat().st_size == (tmp_path / "v1" / "valid.txt").stat().st_size
    assert compare.main([str(tmp_path / "runs")]) == 2
    assert "not seeds of one configuration: data/validation_sha256" in capsys.readouterr().err


def test_a_run_not_yet_validated_is_named_not_dropped(tmp_path, capsys):
    """A run stopped (or still training) before its first validation has no value for a table: each
    report names it above its table, where it would otherwise be missing without a word."""
    fit(tmp_path / "a", steps=2, every=2)
    fit(tmp_path / "b", "--model.head=untied", steps=2, every=2)
    with pytest.raises(SystemExit):  # Ctrl-C before the first validation
        stop = ["--trainer.callbacks+=tests.probes.SignalAt", "--trainer.callbacks.step=1"]
        fit(tmp_path / "c", "--model.head=untied", "--seed_everything=1", *stop, steps=2, every=2)
    late = only_run(tmp_path / "c").name
    named = f"Not validated yet (not in the tables): untied seed 1 ({late})"
    assert compare.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert named in out and "| untied | 0 |" in out
    assert tool("buckets").main([str(tmp_path)]) == 0
    assert named in capsys.readouterr().out
    assert compare.main([str(tmp_path / "c")]) == 2
    assert named in capsys.readouterr().err
    both = "Diverged (...): tied seed 0 at step 4\n\nNot validated yet (...): untied seed 1 (r)"
    assert comparable.no_runs_message([Path("runs")], both).splitlines() == [
        "error: no lmheads runs with validation loss under runs; Diverged (...): tied seed 0 at step 4; "
        "Not validated yet (...): untied seed 1 (r)"
    ]


def test_a_run_with_a_damaged_event_file_is_named_not_reported_from_what_precedes_the_damage(
    tmp_path, capsys
):
    """TensorBoard stops reading an event file at a record that fails its checksum, without a word: the
    run would report the values before it as its last, or read as never validated. A record cut short at
    the end of a file (a run killed while it wrote) is not damage."""
    fit(tmp_path, steps=4, every=2)
    fit(tmp_path, "--model.head=untied", steps=4, every=2)
    tied, untied = (
        next((tmp_path / "quickstart").glob(f"{head}-*/events.out.tfevents.*")) for head in ("tied", "untied")
    )
    data = bytearray(tied.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tied.write_bytes(bytes(data))
    untied.write_bytes(untied.read_bytes()[:-3])
    assert runlog.damaged_at(untied) is None and runlog.damaged_at(tied) is not None
    assert compare.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    damaged = (
        "Damaged TensorBoard files (a record fails its checksum, and nothing after it can be read; not in the"
    )
    assert f"{damaged} tables): tied seed 0 ({tied.parent.name}: {tied.name} from byte " in out
    assert "| untied | 0 |" in out and "| tied |" not in out and "Not validated" not in out


def test_a_grouping_no_run_records_and_a_step_before_training_are_refused(tmp_path, capsys):
    """``--by`` a key no run records would group every run as ``key=None``; ``--step 0`` or less names no
    state of any run."""
    fit(tmp_path, steps=2, every=2)
    for report in (compare, tool("buckets")):
        assert report.main([str(tmp_path), "--by", "model.dropout", "train_set_tokens"]) == 2
        assert "error: --by model.dropout: no run records it" in capsys.readouterr().err
        assert report.main([str(tmp_path), "--step", "0"]) == 2
        assert "error: --step 0: give a number of steps trained, 1 or more" in capsys.readouterr().err


@pytest.mark.parametrize("report", ["compare", "buckets", "data_regime", "embeddings"])
def test_a_report_that_could_not_write_where_asked_stops_before_reading_runs(tmp_path, capsys, report):
    """``--out`` a file, or ``--update`` a document without the section: one error line before any work,
    and nothing written (a report stopped half-way would leave its table without the document)."""
    main = tool(report).main
    (tmp_path / "a file").write_text("")
    doc = tmp_path / "doc.md"
    doc.write_text("# no generated section\n")
    runs = [str(tmp_path)] * (2 if report == "embeddings" else 1)
    assert main([*runs, "--out", str(tmp_path / "a file")]) == 2
    assert "error: --out " in capsys.readouterr().err
    assert main([*runs, "--out", str(tmp_path / "a file" / "report")]) == 2  # a file in the folder's path
    assert (
        f"error: --out {tmp_path / 'a file' / 'report'} cannot be made: {tmp_path / 'a file'} is a file"
        in (capsys.readouterr().err)
    )
    if report != "embeddings":
        assert main([*runs, "--out", str(tmp_path / "out"), "--update", str(doc), "--section", "x"]) == 2
        assert "has no <!-- compare:x:begin --> ... <!-- compare:x:end --> section" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a file", "doc.md"]
    assert doc.read_text() == "# no generated section\n"


@pytest.mark.parametrize("fails", ["figure", "document"])
def test_a_report_onto_a_full_disk_is_one_line_and_leaves_what_was_there(
    tmp_path, capsys, monkeypatch, fails
):
    """The disk fills while a report writes a figure over an older one, or a document's section: the file
    was left cut short (a document losing everything after the write stopped) and the command ended in a
    traceback. Each file is written whole or not at all, and the command says so in one line."""
    import matplotlib.figure

    fit(tmp_path / "runs", steps=2, every=2)
    out, doc = tmp_path / "report", tmp_path / "doc.md"
    out.mkdir()
    (out / "val_loss_vs_step.png").write_bytes(b"an older figure")
    doc.write_text("# Results\n<!-- compare:begin -->\nold\n<!-- compare:end -->\nafter the section\n")
    before = {p.name: p.read_bytes() for p in [doc, *out.iterdir()]}

    real_write_text = Path.write_text

    def cut_short(self, target, *args, **kwargs):  # a figure, or the document's text
        if fails == "figure":
            Path(target).write_bytes(b"par")
        elif self.parent != doc.parent:
            return real_write_text(self, target, *args, **kwargs)
        else:
            real_write_text(self, target[:3])
        raise OSError(errno.ENOSPC, "No space left on device")

    if fails == "figure":
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", cut_short)
    else:
        monkeypatch.setattr(Path, "write_text", cut_short)
    args = [str(tmp_path / "runs"), "--update", str(doc)] + (["--out", str(out)] if fails == "figure" else [])
    assert compare.main(args) == 2
    assert capsys.readouterr().err == (
        f"error: {out / 'val_loss_vs_step.png' if fails == 'figure' else doc} could not be written (No space "
        "left on device); free space there, or give --out or --update another place; each file the report "
        "wrote is whole, the others as they were\n"
    )
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in [doc, *out.iterdir()] if p.name != "table.md"}
    assert after == {k: v for k, v in before.items() if k != "table.md"}  # no partial file either


def test_a_document_whose_section_is_not_one_is_refused_before_anything_is_written(tmp_path, capsys):
    """``--update`` a document whose markers are repeated (which section?) or reversed: one error line
    before any run is read, and the document as it was (the first of two sections was replaced without a
    word; reversed markers were a traceback after ``--out`` had been written)."""
    doc, twice = tmp_path / "doc.md", "<!-- compare:begin -->\nA\n<!-- compare:end -->\n"
    for content, said in [
        (twice * 2, "more than once; name each section (<!-- compare:NAME:begin --> ..."),
        (
            "<!-- compare:end -->\n<!-- compare:begin -->\n",
            "has <!-- compare:end --> before <!-- compare:begin",
        ),
    ]:
        doc.write_text(content)
        assert compare.main([str(tmp_path), "--update", str(doc), "--out", str(tmp_path / "out")]) == 2
        assert f"error: {doc} has " in (err := capsys.readouterr().err) and said in err
        assert doc.read_text() == content and not (tmp_path / "out").exists()


def test_a_run_record_that_does_not_parse_is_one_line_naming_it(tmp_path, capsys):
    """A record cut short (a copy, an edit) is named, not a traceback from a JSON or YAML parser, nor a
    run left out of the table without a word."""
    fit(tmp_path, steps=2, every=2)
    for record, text, why in [
        ("results.json", '{"step": ', "Expecting value: line 1 column 10 (char 9)"),
        ("hparams.yaml", "head: [tied", "expected ',' or ']', but got '<stream end>' at line 1"),
        ("config.yaml", "- a list", "a list, not a mapping"),
    ]:
        path = only_run(tmp_path) / record
        whole = path.read_text()
        path.write_text(text)
        for report in ("compare", "buckets", "data_regime", "frontier"):
            assert tool(report).main([str(tmp_path)]) == 2, report
            message = f"error: {path} cannot be read ({why}); restore it from a copy, or move its run away\n"
            assert capsys.readouterr().err == message
        path.write_text(whole)


@pytest.mark.slow
def test_sweep_runs_jobs_side_by_side_with_a_share_of_the_cores(tmp_path, monkeypatch):
    """Two runs at once, each told to use half the cores; both finish and are recorded."""
    seen = []
    real = sweep.subprocess.Popen

    def recording_popen(cmd, **kwargs):
        seen.append(kwargs["env"].get("OMP_NUM_THREADS"))
        return real(cmd, **kwargs)

    monkeypatch.setattr(sweep.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(sweep.subprocess, "Popen", recording_popen)
    args = ["--config", str(ROOT / "configs/quickstart.yaml"), "--heads", "tied", "untied", "--seeds", "0"]
    rc = sweep.main([*args, "--root", str(tmp_path), "--name", "jobs", "--jobs", "2", "--",
                     "--trainer.max_steps=2", *TINY])  # fmt: skip
    assert rc == 0 and seen == ["1", "1"]
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == ["tied-seed0", "untied-seed0"]
    assert sweep.thread_env(1) == {}
    assert sweep.thread_env(16)["OMP_NUM_THREADS"] == "1"  # more runs than cores (here 2): one each
    assert sweep.thread_env(16)["TORCHINDUCTOR_COMPILE_THREADS"] == "1"  # and no pool of compile workers


@pytest.mark.slow
def test_match_params_reaches_two_percent(capsys):
    heads = ["tied", "untied", "tied_bias"]
    matched = sweep.matched_widths([str(ROOT / "configs/quickstart.yaml")], heads, [])
    width = {head: int(options["model.backbone.d_model"]) for head, options in matched.items()}
    assert width["untied"] == 128 and width["tied"] > 128
    for options in matched.values():  # the attention heads divide the width
        assert int(options["model.backbone.d_model"]) % int(options["model.backbone.n_head"]) == 0
    counts = {}
    for line in capsys.readouterr().out.splitlines():
        head, _, rest = line.partition(": d_model=")
        if rest:
            counts[head] = int(rest.split(", ")[2].split(" ")[0].replace(",", ""))
    assert set(counts) == {"tied", "untied", "tied_bias"}
    assert max(counts.values()) - min(counts.values()) <= 0.02 * max(counts.values())


@pytest.mark.slow
def test_data_regime_and_bucket_reports(tmp_path, capsys):
    for head in ("tied", "untied"):
        for tokens in (4096, 65536):
            data = f"--data.init_args.train_tokens={tokens}"
            fit(tmp_path / f"{head}-{tokens}", f"--model.head={head}", data, steps=4, every=2)
    regime, buckets = tool("data_regime"), tool("buckets")
    assert regime.main([str(tmp_path), "--out", str(tmp_path / "regime")]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| tied |", "| untied |"))]
    assert len(rows) == 4 and "| 4,096 | 2.0 |" in out  # 4 steps x 32 x 64 tokens over 4,096
    assert (tmp_path / "regime" / "excess_loss_vs_training_tokens.png").is_file()
    assert buckets.main([str(tmp_path), "--by", "train_set_tokens", "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "| train_set_tokens=4,096 | 1 |" in out and "rarest 90%" in out
    assert (tmp_path / "b" / "bucket_differences.png").is_file()
    # by how often a type occurs in training: the same buckets whatever the vocabulary
    logged = scalars(only_run(tmp_path / "tied-4096"))
    shares = [v[-1][1] for tag, v in logged.items() if tag.startswith("val_count/token_share_")]
    assert abs(sum(shares) - 1) < 1e-6 and "val_count/loss_100plus" in logged
    counts = ["--by", "train_set_tokens", "--counts", "--out", str(tmp_path / "c")]
    assert buckets.main([str(tmp_path), *counts]) == 0
    out = capsys.readouterr().out
    assert "| runs | pairs | all tokens |" in out and "seen 100+ times" in out and "rarest 90%" not in out
    # a head against itself (all zeros), or a head with no runs, is refused before any work
    for heads, said in ((["--heads", "tied", "tied"], "--heads names tied twice; give two different heads"),
                        (["--heads", "tied", "TiedHead"], "no runs of head TiedHead among the runs given; "
                         "their heads: tied, untied"),
                        (["--against", "mos"], "no runs of head mos among the runs given")):  # fmt: skip
        assert buckets.main([str(tmp_path), *heads, "--out", str(tmp_path / "n")]) == 2
        assert said in capsys.readouterr().err and not (tmp_path / "n").exists()
    over = ["--by", "train_set_tokens", "--over-steps", "--out", str(tmp_path / "s")]
    assert buckets.main([str(tmp_path), "--heads", "untied", "tied", *over]) == 0
    out = capsys.readouterr().out
    loss = {
        head: dict(scalars(only_run(tmp_path / f"{head}-4096"))["val/loss"]) for head in ("tied", "untied")
    }
    for step, epochs in ((2, 1.0), (4, 2.0)):  # validations logged at steps 1 and 3; 2,048 tokens a step
        difference = loss["untied"][step - 1] - loss["tied"][step - 1]
        assert (
            f"| {step} | {epochs:.1f} | {difference:+.3f} | {difference:+.3f}, 1/1 |" in out
        )  # one seed: no p
    assert "train_set_tokens=65,536:" in out and (tmp_path / "s" / "differences_over_steps.png").is_file()
    # seed 1 of untied, and of tied with another learning rate: not one more seed of tied at that size
    for head, lr in (("untied", "0.003"), ("tied", "0.01")):
        options = (f"--model.head={head}", f"--model.lr={lr}", "--seed_everything=1")
        fit(tmp_path / f"{head}-4096-1", *options, "--data.init_args.train_tokens=4096", steps=4, every=2)
    assert regime.main([str(tmp_path), "--out", str(tmp_path / "mixed")]) == 2
    mixed = (
        "error: the runs of tied with 4,096 training tokens are not seeds of one configuration: lr (0.003,"
    )
    assert mixed in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"error: the runs of tied \(train_set_tokens=4,096\) are not seeds"):
        buckets.main([str(tmp_path), "--by", "train_set_tokens", "--out", str(tmp_path / "mixed")])
    assert not (tmp_path / "mixed").exists()


def test_data_regime_needs_an_excess_loss_and_says_which_data_logs_it(tmp_path, capsys, monkeypatch):
    regime = tool("data_regime")
    text_run = runlog.RunLog(tmp_path / "tied-0", {"head": "tied", "seed": 0}, {"val/loss": {9: (5.0, 1.0)}})
    monkeypatch.setattr(regime, "find_runs", lambda roots: [text_run])
    assert regime.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"error: no runs with an excess loss under {tmp_path} (only data with a known optimum, the synthetic "
        "language, logs val/excess_loss)\n"
    )


def test_heads_to_pair_are_found_by_head_whatever_their_options(tmp_path):
    """A head given options (``untied (bias=True)`` in tables) is still the head ``untied`` that runs are
    paired by: not refused as absent."""
    pairs = tool("pairs")
    runs = [
        runlog.RunLog(tmp_path / "a", {"head": "tied", "seed": 0, "head_options": "{}"}, {}),
        runlog.RunLog(tmp_path / "b", {"head": "untied", "seed": 0, "head_options": '{"bias": true}'}, {}),
    ]
    assert runs[1].label == "untied (bias=True)"
    assert pairs.absent_heads(runs, ["untied", "tied"]) == ""
    assert pairs.absent_heads(runs, ["mos"]).endswith("their heads: tied, untied")


def test_compare_orders_groups_by_the_values_of_by_as_numbers(tmp_path, capsys, monkeypatch):
    """Rows of one head split by ``--by lr`` come in the order of the learning rates, 0.0005 before
    0.001, not in the order of their text."""
    runs = [
        runlog.RunLog(
            tmp_path / f"tied-{lr}", {"head": "tied", "seed": 0, "lr": lr}, {"val/loss": {9: (5.0, 1.0)}}
        )
        for lr in (0.004, 0.0005, 0.002, 0.001)
    ]
    monkeypatch.setattr(compare, "find_runs", lambda roots, checkpoint="last": runs)
    assert compare.main([str(tmp_path), "--by", "lr"]) == 0
    rows = [
        line.split(" | ")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("| tied")
    ]
    assert rows == ["| tied, lr=0.0005", "| tied, lr=0.001", "| tied, lr=0.002", "| tied, lr=0.004"]


def test_runs_on_other_data_are_named_above_the_table(tmp_path, capsys, monkeypatch):
    """Heads trained or validated on other data (another tokenizer, text or size of training set) in one
    table: a warning line names which runs had which, unless ``--by`` splits the rows by such a setting."""

    def run(head: str, tokenizer: str, seed: int = 0) -> runlog.RunLog:
        hparams = {"head": head, "seed": seed, "tokenizer": tokenizer, "vocab_size": 59, "lr": 0.01}
        config = {"data.init_args.tokenizer": tokenizer, "data.init_args.batch_size": 32 + seed}
        return runlog.RunLog(
            tmp_path / f"{head}-{seed}", hparams, {"val/loss": {9: (5.0, 1.0)}}, config=config
        )

    runs = [run("tied", "bpe"), run("untied", "char")]
    monkeypatch.setattr(compare, "find_runs", lambda roots, checkpoint="last": runs)
    assert compare.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (
        "Data: WARNING: runs differ in what they trained or were validated on, so their losses per token do "
        "not compare; tokenizer=bpe: tied seed 0; tokenizer=char: untied seed 0\n" in out
    )
    assert compare.main([str(tmp_path), "--by", "tokenizer"]) == 0  # a study of tokenizers
    assert "WARNING" not in capsys.readouterr().out
    runs[1] = run("untied", "bpe", seed=1)  # the same data; the batch size is the budget line's
    assert comparable.other_data({"all": runs}, []) == ""
    buckets = tool("buckets")
    runs[:] = [run("tied", "bpe"), run("untied", "char")]
    monkeypatch.setattr(buckets, "find_runs", lambda roots: runs)
    assert buckets.main([str(tmp_path), "--heads", "tied", "untied"]) == 0
    assert capsys.readouterr().out.startswith("Data: WARNING: runs differ in what they trained")


def test_the_statistics_policy():
    """A paired effect over seeds: its mean, the 95% t-interval (t = 4.303 at 2 degrees of freedom), the
    seeds agreeing in sign, scipy's paired t-test from three seeds, and Holm's adjustment within a
    family; with two seeds, no p-value."""
    # three seeds that differ by -0.130, -0.044 and -0.086: t = 3.50 with 2 degrees of freedom
    e = stats.effect([-0.130, -0.044, -0.086])
    assert abs(e.p - 0.0732) < 1e-4 and e.agree == 3 and e.n == 3
    half = 4.303 * statistics.stdev([-0.130, -0.044, -0.086]) / math.sqrt(3)
    assert abs(e.low - (e.mean - half)) < 1e-4 and abs(e.high - (e.mean + half)) < 1e-4
    assert stats.effect([0.1, 0.2]).p is None and stats.effect([0.1]).low is None
    assert stats.effect([0.0, 0.0, 0.0]).p == 1.0 and stats.effect([0.1, 0.1, 0.1]).p == 0.0
    assert stats.holm([0.01, 0.04, None, 0.03]) == [0.03, 0.06, None, 0.06]
    texts = stats.family([[-0.130, -0.044, -0.086], [0.1, 0.2], [0.01, 0.02, -0.01, 0.03, 0.0]])
    assert texts == [
        "-0.087 [-0.193, +0.020], 3/3, p 0.073 (Holm 0.146)",
        "+0.150 [-0.485, +0.785], 2/2",
        "+0.010 [-0.010, +0.030], 3/5, p 0.230 (Holm 0.230)",
    ]


def test_runs_stopped_at_other_points_compare_as_they_stood_at_one_step(tmp_path):
    """A time limit stopped runs between validations: ``--step N`` takes each as it stood after N steps,
    and its test only where the tested checkpoint was of step N or before."""
    scalars = {"val/loss": {49: (6.0, 30.0), 99: (5.0, 60.0)}, "test/loss": {0: (5.1, 1.0)}}
    run = runlog.RunLog(tmp_path / "r", {"head": "tied", "seed": 0}, scalars, final_step=120, tested_at=120)
    early = run.until(50)
    assert (early.final("val/loss"), early.validated_at(), early.steps()) == (6.0, 50, 50)
    assert early.minutes() == 0.5
    assert "test/loss" not in early.scalars  # the tested checkpoint is of step 120
    assert run.until(120).final("test/loss") == 5.1 and run.final("val/loss") == 5.0  # the run itself kept
    short = runlog.RunLog(tmp_path / "s", {"head": "tied", "seed": 1}, {"val/loss": {49: (6.5, 30.0)}})
    cut, missing = comparable.at_step([run, short], 100)
    assert missing == "no validation after 100 steps in tied seed 1 (s); give a step every run validated at"
    cut, missing = comparable.at_step([run, short], 50)
    assert not missing and [r.final("val/loss") for r in cut] == [6.0, 6.5]


def test_a_figure_of_some_of_a_rows_runs_says_of_how_many():
    """A row of seeds 0,1 where only seed 0 was tested shows seed 0's test, marked as one run's."""
    assert stats.mean_std([1.0, 3.0], 1) == "2.0 ± 1.4"
    assert stats.mean_std([113.449, None], 2) == "113.45 (1 of 2)"
    assert stats.mean_std([1.0, 3.0, float("nan")], 1) == "2.0 ± 1.4 (2 of 3)"
    assert stats.mean_std([None, None], 1) == "–"


def test_compilation_does_not_tell_seeds_apart(tmp_path):
    """Runs compiled with the loss in the graph and without it (model.compile_loss) are seeds of one
    configuration, as compiled and eager runs are; another learning rate is not."""

    def run(seed: int, **config) -> runlog.RunLog:
        config = {"model.lr": 0.003, "model.compile": True, "model.compile_loss": True, **config}
        hparams = {"head": "tied", "seed": seed}
        return runlog.RunLog(tmp_path / str(seed), hparams, {"val/loss": {9: (5.0, 1.0)}}, config=config)

    seeds = [run(0), run(1, **{"model.compile_loss": False}), run(2, **{"model.compile": False})]
    assert comparable.mixed({"tied": seeds}) is None
    reason, key = comparable.mixed({"tied": [*seeds, run(3, **{"model.lr": 0.001})]})
    assert key == "model.lr" and "not seeds of one configuration: model.lr (0.001, 0.003)" in reason


def test_callbacks_that_keep_or_report_a_run_do_not_tell_seeds_apart(tmp_path):
    """Which checkpoints a run keeps, what it monitors and when it stops early (its length) leave it a seed
    of its configuration; a callback that may change training (one of the user's own) does not."""

    def run(seed: int, *callbacks: str) -> runlog.RunLog:
        given = [{"class_path": c, "init_args": {"save_top_k": seed}} for c in callbacks] or None
        config = dotted.flatten({"trainer": {"callbacks": given}}, as_text=True)
        hparams = {"head": "tied", "seed": seed}
        return runlog.RunLog(tmp_path / str(seed), hparams, {"val/loss": {9: (5.0, 1.0)}}, config=config)

    kept = ["lmheads.checkpointing.RunCheckpoint", "lightning.pytorch.callbacks.EarlyStopping"]
    seeds = [run(0), run(1, *kept), run(2, "lightning.pytorch.callbacks.LearningRateMonitor")]
    assert comparable.mixed({"tied": seeds}) is None
    reason, key = comparable.mixed({"tied": [*seeds, run(3, *kept, "my_callbacks.Sharpen")]})
    assert key == "trainer.callbacks" and "my_callbacks.Sharpen" in reason


def test_final_values_of_different_budgets_are_neither_averaged_nor_paired(tmp_path):
    """Runs last validated after other numbers of steps (one stopped early, or continued): their final
    values are not of one budget, so neither a mean over seeds nor a difference of heads is made of them."""

    def run(head: str, seed: int, step: int) -> runlog.RunLog:
        hparams = {"head": head, "seed": seed}
        return runlog.RunLog(tmp_path / f"{head}-{seed}", hparams, {"val/loss": {step: (5.0, 1.0)}})

    reason, key = comparable.mixed({"tied": [run("tied", 0, 99), run("tied", 1, 49)]})
    assert reason.startswith("the runs of tied were last validated after 100 steps (tied seed 0), 50 steps")
    assert key is None and comparable.mixed({"tied": [run("tied", 0, 99), run("tied", 1, 99)]}) is None
    pairs = tool("pairs")
    with pytest.raises(SystemExit, match=r"the runs of seed 0 were last validated after 150 steps \(untied"):
        pairs.against([run("tied", 0, 99), run("untied", 0, 149)], "tied", [])
    # over steps, the validations both logged are compared, however long each ran
    tied, untied = run("tied", 0, 99), run("untied", 0, 149)
    for curve, steps in ((tied.scalars["val/loss"], (49,)), (untied.scalars["val/loss"], (49, 99))):
        curve.update(dict.fromkeys(steps, (6.0, 0.5)))
    paired = pairs.pairs_by_group([tied, untied], "untied", "tied", [], final=False)
    assert pairs.over_steps(paired)["all runs"]["steps"] == [50, 100]


def test_buckets_against_one_head_gives_each_other_head_per_seed(tmp_path, capsys, monkeypatch):
    def run(head: str, seed: int, loss: float) -> runlog.RunLog:
        hparams = {"head": head, "seed": seed, "lr": 0.01}
        return runlog.RunLog(tmp_path / f"{head}-{seed}", hparams, {"val/loss": {9: (loss, 1.0)}})

    runs = [run("tied", 0, 5.0), run("tied", 1, 5.5), run("untied", 0, 4.75), run("untied", 1, 5.5)]
    runs += [run("tied_bias", 0, 5.25), run("tied_bias", 1, 6.0), run("mos", 1, 5.0)]  # mos: seed 1 only
    buckets, pairs = tool("buckets"), tool("pairs")
    rows = pairs.against(runs, "tied", [])
    assert rows == {"mos": {1: -0.5}, "untied": {0: -0.25, 1: 0.0}, "tied_bias": {0: 0.25, 1: 0.5}}
    assert list(rows) == ["mos", "untied", "tied_bias"]  # by the mean difference
    for r in runs:  # two data sizes: group by group (in the order of their values), by the mean within
        r.hparams["tokens"] = 1_000_000 if r.hparams["seed"] else 20_000
    grouped = pairs.against(runs, "tied", ["tokens"])
    assert list(grouped) == [
        "untied (tokens=20,000)", "tied_bias (tokens=20,000)",
        "mos (tokens=1,000,000)", "untied (tokens=1,000,000)", "tied_bias (tokens=1,000,000)",
    ]  # fmt: skip
    for r in runs:
        del r.hparams["tokens"]
    text = buckets.against_table(rows, "each head", "tied")
    assert "| head | seed 0 | seed 1 | effect |" in text
    # two seeds: the interval (t = 12.706 at one degree of freedom) and the signs, no p-value
    assert "| mos | – | -0.500 | -0.500, 1/1 |" in text
    assert "| tied_bias | +0.250 | +0.500 | +0.375 [-1.213, +1.963], 2/2 |" in text
    monkeypatch.setattr(buckets, "find_runs", lambda roots: runs)
    doc = tmp_path / "results.md"
    begin, end = tool("report").markers("versus")
    doc.write_text(f"{begin}\nold\n{end}\n")
    out = tmp_path / "report"
    command = [
        str(tmp_path),
        "--against",
        "tied",
        "--out",
        str(out),
        "--update",
        str(doc),
        "--section",
        "versus",
    ]
    assert buckets.main(command) == 0
    assert (
        "| untied | -0.250 | +0.000 | -0.125 [-1.713, +1.463], 1/2 |" in doc.read_text()
        and (out / "against_tied.png").is_file()
    )
    assert buckets.main([str(tmp_path), "--against", "nohead"]) == 2
    # a run with no partner of its seed is named above the table, not left out without a word
    capsys.readouterr()
    assert buckets.main([str(tmp_path), "--heads", "mos", "tied"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        "Without a run of the other head with the same seed (not in the table): tied seed 0 (tied-0)\n"
    )
    assert pairs.unpaired(runs, {"tied": {"untied"}, "untied": {"tied"}}, []) == ""


def test_frontier_places_each_run_by_its_way_of_saving(tmp_path, capsys):
    """The reference (largest untied run without sharing), the tie and one block for both layers: one
    row each, with the parameters saved and the loss paired by seed (final, or each run's lowest); a run
    that saves two ways at once, or runs of other budgets, are refused."""
    frontier = tool("frontier")
    for extra in (["--model.head=untied"], [], ["--model.head=untied", "--model.backbone.layer_sharing=all"]):
        fit(tmp_path / "runs", "--model.backbone.n_layer=2", *extra, steps=2, every=2)
    out = tmp_path / "report"
    assert frontier.main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    report = capsys.readouterr().out
    rows = [line for line in report.splitlines() if line.startswith("| ") and "way of saving" not in line]
    assert [row.split(" | ")[:2] for row in rows] == [
        ["| reference", "reference"],
        ["| tie", "tied"],
        ["| share layers", "k=1 (all)"],
    ]
    # one seed: the difference and its sign, no interval or p; the same per 100k parameters saved
    assert "| 32,768 |" in rows[1] and re.search(r"\| [+-]\d\.\d{4}, 1/1 \| [+-]\d\.\d{4} \|$", rows[1])
    assert "Loss per 100k parameters saved" in report and (out / "frontier.png").is_file()
    runs = runlog.find_runs([tmp_path / "runs"])
    assert frontier.budget_problem(runs) == ""
    later = {tag: {step + 2: v for step, v in points.items()} for tag, points in runs[0].scalars.items()}
    assert "last validated after different budgets" in frontier.budget_problem(
        [dataclasses.replace(runs[0], scalars=later), *runs[1:]]
    )
    # --at best pairs each run's lowest validation loss: an earlier, lower one of the reference's counts
    reference, grouped = frontier.points(runs, "untied")
    (ref_run,) = grouped[("reference", "reference")]
    ref_run.scalars["val/loss"][-1] = (0.125, 0.0)
    best, _ = frontier.table(reference, grouped, "best")
    final, _ = frontier.table(reference, grouped, "final")
    assert "| 0.1250 |" in best and "| 0.1250 |" not in final
    assert re.search(r"\| tied \|.*\| \+\d\.\d{4}, 1/1 \|", best)  # the tie's loss minus 0.125
    assert "No reference run" not in best
    (tie,) = grouped[("tie", "tied")]
    grouped[("tie", "tied")].append(dataclasses.replace(tie, hparams={**tie.hparams, "seed": 7}))
    assert frontier.table(reference, grouped, "final")[0].startswith(
        "No reference run of their seed (not in 'minus reference'): tie tied seed 7\n"
    )
    shared = ["--model.backbone.n_layer=2", "--model.backbone.layer_sharing=all"]
    fit(tmp_path / "runs", *shared, steps=2, every=2)  # tied and shared: two ways at once
    assert frontier.main([str(tmp_path / "runs")]) == 2
    assert "is not one way of saving from the reference" in capsys.readouterr().err


def test_the_sharing_study_has_grids_for_every_study_config_and_refuses_what_it_cannot_run():
    """Every layer-sharing config has the study's grids; no config, or one without grids, is one
    ``error:`` line (no config was bash's "unbound variable")."""
    script = ROOT / "tools" / "sharing_study.sh"
    for args, said in (
        ([], "error: give a study config; usage:"),
        (["configs/quickstart.yaml"], "error: no grids"),
    ):
        result = subprocess.run(["bash", str(script), *args], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.startswith(said) and result.stderr.count("\n") == 1
    studies = sorted(p.stem for p in (ROOT / "configs" / "experiments").glob("sharing_*.yaml"))
    assert studies and all(f"\n  {name}) widths=" in script.read_text() for name in studies)


@pytest.mark.skipif(
    (ROOT / ".whl").exists() or torch.cuda.is_available(),
    reason="would install the carried wheels or run the whole GPU script",
)
def test_the_gpu_scripts_refuse_before_they_write(tmp_path):
    """An unknown option, a folder that already holds a report, and a machine without CUDA are each one
    ``error:`` line on stderr, and no output or runs folder is left behind; OUT_DIR is read from the
    folder the script is called in."""
    corpora = tmp_path / "corpora"
    for file in (
        "wikitext-2/train.txt",
        "wikitext-2/valid.txt",
        "wikitext-2/test.txt",
        "tinyshakespeare/input.txt",
    ):
        (corpora / file).parent.mkdir(parents=True, exist_ok=True)
        (corpora / file).write_text("a b c\n")
    env = {**os.environ, "LMHEADS_DATA": str(corpora), "LMHEADS_STUDY_RUNS": "study-runs"}
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "machine.txt").write_text("an earlier report\n")
    for script in ("gpu_check.sh", "gpu_study.sh"):
        for args, code, said in (
            (["--help"], 2, "error: unknown option --help; usage: bash tools/" + script),
            (["earlier"], 2, f"error: {tmp_path / 'earlier'} is not empty"),
            (["new"], 1, "error: no CUDA device is visible to torch"),
        ):
            result = subprocess.run(
                ["bash", str(ROOT / "tools" / script), *args],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
            )
            assert (result.returncode, result.stdout) == (code, ""), result.stderr
            assert result.stderr.startswith(said) and result.stderr.count("\n") == 1, result.stderr
            assert sorted(p.name for p in tmp_path.iterdir()) == ["corpora", "earlier"], (script, args)
    assert (tmp_path / "earlier" / "machine.txt").read_text() == "an earlier report\n"


def test_figures_place_every_kept_setting_and_adjust_the_endings_as_one_family(tmp_path, capsys):
    """Figures 1 and 2 are drawn from the committed per-seed tables: one curve per setting (a study's
    table repeated in another study counted once), each ending in the table with its Holm adjustment."""
    figures = tool("figures")
    data = figures.curves()
    settings = list(dict.fromkeys(data["setting"]))
    assert len(settings) == len(set(settings)) == 10
    assert all(len(d) >= 2 for d in data["differences"])
    assert figures.main(["--out", str(tmp_path)]) == 0
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n| ") == 1 + len(settings) and "Holm's adjustment within this table's 10" in table
    assert {p.name for p in tmp_path.glob("*.png")} == {
        "figure1_untied_minus_tied_vs_epochs.png",
        "figure2_untied_minus_tied_vs_tokens_per_type.png",
    }
    doc = tmp_path / "doc.md"
    doc.write_text("no section\n")
    assert figures.main(["--update", str(doc), "--section", "figures"]) == 2
    assert (
        "has no <!-- compare:figures:begin -->" in capsys.readouterr().err
        and doc.read_text() == "no section\n"
    )
