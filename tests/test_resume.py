"""Exact resume, interruption, non-finite losses and checkpoints that do not fit."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmheads import runlog
from lmheads.errors import ConfigError
from lmheads.heads import UntiedHead
from lmheads.module import LMHeadModule
from lmheads.optim import WarmupCosine
from lmheads.settings import check_validation_interval, check_validations_end_steps

from .helpers import ROOT, SLURM, fit, main, only_run, quick_args, run_lmheads, scalars, tool

DROPOUT = "--model.backbone.dropout=0.1"  # so the random stream matters too


def test_resume_after_ctrl_c_is_bitwise_identical(tmp_path):
    straight = fit(tmp_path / "a", DROPOUT, steps=6, every=3).model
    with pytest.raises(SystemExit) as exc:
        fit(
            tmp_path / "b",
            DROPOUT,
            "--trainer.callbacks+=tests.probes.SignalAt",
            "--trainer.callbacks.step=4",
            steps=6,
            every=3,
        )
    assert exc.value.code == 130
    ckpt = only_run(tmp_path / "b") / "checkpoints" / "interrupted.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 4  # saved between steps, mid-epoch
    resumed = fit(tmp_path / "b", DROPOUT, f"--ckpt_path={ckpt}", steps=6, every=3).model
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    losses = {s: v for s, v in scalars(only_run(tmp_path / "a"))["train/loss"]}
    again = {s: v for s, v in scalars(only_run(tmp_path / "b"))["train/loss"]}
    assert losses == again  # the same data in the same order, before and after the interruption


@pytest.mark.slow
@pytest.mark.parametrize(
    ("validation", "offsets"),
    [
        (["--trainer.check_val_every_n_epoch=null", "--trainer.val_check_interval=4"], "true"),
        (["--trainer.check_val_every_n_epoch=1", "--trainer.val_check_interval=1.0"], "false"),
        (["--trainer.check_val_every_n_epoch=1", "--trainer.val_check_interval=2"], "true"),
    ],
    ids=["every-4-steps-random-offsets", "every-epoch", "within-each-epoch-random-offsets"],
)
def test_resume_at_any_step_of_a_short_epoch_is_exact(tmp_path, validation, offsets):
    """Text in epochs of 3 batches, validated every 4 steps, at each epoch's end, or every 2 batches of
    each epoch (the quickstart's way): a run interrupted
    after an epoch's last batch (3, 6), at a validation (4), or stopped by max_steps (3, 5) and continued
    from last.ckpt, ends with the weights of an uninterrupted 8-step run and logs at the same steps, and
    at the step where the stopped part ended (validated as every run's last step). (All 8 steps are in
    the warmup, where the stopped runs' shorter schedules do not differ.)"""
    text = tmp_path / "t.txt"
    text.write_text("".join(f"line {i}: the {i % 7} cats sat on {i % 11} mats\n" for i in range(150)))
    data = [
        "--data=lmheads.data.TextDataModule", f"--data.train_file={text}", "--data.tokenizer=char",
        f"--data.random_offsets={offsets}", "--data.batch_size=20", f"--data.cache_dir={tmp_path / 'cache'}",
        *validation,
    ]  # fmt: skip

    def run(folder, *extra, steps=8):
        return fit(tmp_path / folder, DROPOUT, *data, *extra, steps=steps, every=4)

    straight = run("straight")
    assert straight.trainer.current_epoch >= 2  # 8 steps of 3-batch epochs
    expected = scalars(only_run(tmp_path / "straight"))
    for stop in (3, 4, 6):
        with pytest.raises(SystemExit):
            signal_at = f"--trainer.callbacks.step={stop}"
            run(f"interrupt{stop}", "--trainer.callbacks+=tests.probes.SignalAt", signal_at)
    for stop in (3, 5):
        run(f"stop{stop}", steps=stop)
        last = only_run(tmp_path / f"stop{stop}") / "checkpoints" / "last.ckpt"
        state = torch.load(last, map_location="cpu", weights_only=False)
        assert state["global_step"] == stop  # where fit ended, also between validations
    for folder in ("interrupt3", "interrupt4", "interrupt6", "stop3", "stop5"):
        checkpoints = only_run(tmp_path / folder) / "checkpoints"
        ckpt = checkpoints / ("interrupted.ckpt" if folder.startswith("interrupt") else "last.ckpt")
        resumed = run(folder, f"--ckpt_path={ckpt}")
        weights = zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True)
        for (name, a), b in weights:
            assert torch.equal(a, b), (folder, name)
        logged = scalars(only_run(tmp_path / folder))
        assert dict(logged["train/loss"]) == dict(expected["train/loss"]), folder
        validated, straight_validated = dict(logged["val/loss"]), dict(expected["val/loss"])
        stopped = {int(folder[4:]) - 1} if folder.startswith("stop") else set()  # its last step, validated
        assert stopped <= validated.keys(), folder
        extra = stopped - straight_validated.keys()
        assert {s: v for s, v in validated.items() if s not in extra} == straight_validated, folder


def test_an_epoch_based_run_resumed_mid_epoch_is_exact(tmp_path):
    """With max_epochs and no max_steps, Lightning builds the training loader to size the schedule before
    it restores its progress: the resumed epoch must still skip the batches it trained (it replayed them)."""
    epochs = ["--trainer.max_steps=-1", "--trainer.max_epochs=2", "--data.init_args.train_tokens=16384"]
    straight = fit(tmp_path / "a", DROPOUT, *epochs, every=4).model  # 8 batches an epoch
    with pytest.raises(SystemExit):
        fit(tmp_path / "b", DROPOUT, *epochs, "--trainer.callbacks+=tests.probes.SignalAt",
            "--trainer.callbacks.step=11", every=4)  # fmt: skip
    ckpt = only_run(tmp_path / "b") / "checkpoints" / "interrupted.ckpt"
    resumed = fit(tmp_path / "b", DROPOUT, *epochs, f"--ckpt_path={ckpt}", every=4).model
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for tag in ("train/loss", "val/loss"):
        assert scalars(only_run(tmp_path / "a"))[tag] == scalars(only_run(tmp_path / "b"))[tag], tag


def test_a_stop_between_the_batches_of_an_accumulated_step_waits_for_its_end(tmp_path):
    """Ctrl-C, or a stop asked for (max_time's), after a batch that only accumulated gradients (which no
    checkpoint holds) takes effect after the step's remaining batch: resuming then reproduces the
    uninterrupted run, and the run's last validation and checkpoint are of whole steps."""
    accumulate = ["--trainer.accumulate_grad_batches=2", DROPOUT]
    straight = fit(tmp_path / "a", *accumulate, every=4).model
    with pytest.raises(SystemExit):
        fit(tmp_path / "b", *accumulate, "--trainer.callbacks+=tests.probes.SignalAt",
            "--trainer.callbacks.batch=6", every=4)  # fmt: skip  # the first batch of step 4
    ckpt = only_run(tmp_path / "b") / "checkpoints" / "interrupted.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 4
    resumed = fit(tmp_path / "b", *accumulate, f"--ckpt_path={ckpt}", every=4).model
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    stopped = fit(tmp_path / "c", *accumulate, "--trainer.callbacks+=tests.probes.StopAfterBatch",
                  "--trainer.callbacks.batch=4", every=4)  # fmt: skip  # the first batch of step 3
    assert stopped.trainer.global_step == 3
    last = torch.load(only_run(tmp_path / "c") / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"] == 6
    assert [s for s, _ in scalars(only_run(tmp_path / "c"))["val/loss"]] == [1, 2]  # steps 2 and 3, ended


def test_a_slurm_requeue_checkpoint_is_of_a_whole_step(tmp_path, monkeypatch):
    """Lightning's SLURM auto-requeue saves a checkpoint on SIGUSR1 wherever it lands; lmheads holds it to
    the step's end, so the job requeued after the kill continues exactly. (Here the requeue itself fails,
    as there is no scontrol; the kill comes a step later.)"""
    accumulate = ["--trainer.accumulate_grad_batches=2", DROPOUT]
    straight = fit(tmp_path / "a", *accumulate, every=4).model
    for name, value in SLURM.items():
        monkeypatch.setenv(name, value)
    requeued = [f"--trainer.callbacks.signum={int(signal.SIGUSR1)}", "--trainer.callbacks.batch=6"]
    killed = ["--trainer.callbacks+=tests.probes.ExitAt", "--trainer.callbacks.step=5"]
    args = [*quick_args(tmp_path / "b"), *accumulate, "--trainer.val_check_interval=4"]
    done = run_lmheads(
        "fit", *args, "--trainer.callbacks+=tests.probes.SignalAt", *requeued, *killed, cwd=tmp_path
    )
    assert done.returncode == 137, done.stderr[-2000:]
    ckpt = only_run(tmp_path / "b") / "hpc_ckpt_1.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 4  # SIGUSR1 in step 4
    resumed = fit(tmp_path / "b", *accumulate, f"--ckpt_path={ckpt}", every=4).model
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("every", "batches", "across", "refused"),
    [
        (4, 32, False, False),
        (3, 32, False, True),  # within each epoch: a multiple of the accumulation, or the epoch's end
        (5, 5, False, False),
        (4, 32, True, False),
        (4, 5, True, True),  # across epochs: an epoch of 5 batches ends with a step of one, and batch 8
        (10, 5, True, False),  # of the count is the first of epoch 2's second step; whole epochs are fine
    ],
)
def test_validations_come_at_the_end_of_steps(every, batches, across, refused):
    trainer = SimpleNamespace(
        accumulate_grad_batches=2, val_check_batch=every, num_training_batches=batches,
        enable_validation=True, check_val_every_n_epoch=None if across else 1,
    )  # fmt: skip
    if refused:
        with pytest.raises(ConfigError, match="falls between the batches of an optimizer step"):
            check_validations_end_steps(trainer)
    else:
        check_validations_end_steps(trainer)
    check_validations_end_steps(SimpleNamespace(**{**vars(trainer), "accumulate_grad_batches": 1}))


def test_an_interval_off_the_steps_is_refused_only_where_something_validates():
    with pytest.raises(
        ConfigError, match=r"Give --trainer.val_check_interval a multiple of 2 \(e.g. 2 or 4\)"
    ):
        check_validation_interval(3, 2)
    for fine in ((4, 2), (3, 1), (1.0, 2), (3, 2, 0), (3, 2, 0.0)):  # (interval, accumulation, val batches)
        check_validation_interval(*fine)


def test_sigterm_saves_and_exits_143(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        fit(tmp_path, "--trainer.callbacks+=tests.probes.SignalAt", "--trainer.callbacks.step=2",
            "--trainer.callbacks.signum=15", steps=6, every=3)  # fmt: skip
    assert exc.value.code == 143
    assert "SIGTERM at step 2: saved" in capsys.readouterr().err
    assert (only_run(tmp_path) / "checkpoints" / "interrupted.ckpt").is_file()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_before_training_leaves_nothing(tmp_path, capsys, signum):
    """Ctrl-C too: not Lightning's "Detected KeyboardInterrupt" and exit status 1, as if it had failed."""
    before = signal.getsignal(signum)
    with pytest.raises(SystemExit) as exc:
        probe = ["--trainer.callbacks+=tests.probes.SignalInSetup", f"--trainer.callbacks.signum={signum}"]
        fit(tmp_path, *probe, steps=6, every=3)
    assert exc.value.code == 128 + signum
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"interrupted: {signum.name} outside training: nothing was saved"
    )
    assert not (tmp_path / "quickstart").exists()  # the run folder it had claimed is gone
    assert signal.getsignal(signum) is before  # and the handler is given back


@pytest.mark.parametrize(("step", "signum"), [(12, signal.SIGTERM), (-1, signal.SIGINT)])  # -1: sanity check
def test_a_signal_to_the_data_loader_workers_too_stops_the_run_as_without_them(tmp_path, step, signum):
    """Ctrl-C in a terminal, or SLURM's SIGTERM, signals every process of the command, its DataLoader
    workers too. They leave the interruption to the main process (a worker that raised made it fail with
    "DataLoader worker exited unexpectedly" and no checkpoint), which saves and stops as without them."""
    text = tmp_path / "train.txt"
    text.write_text("".join(f"line {i}: the {i % 7} cats sat on {i % 11} mats\n" for i in range(3000)))
    data = ["--data=lmheads.data.TextDataModule", f"--data.train_file={text}", f"--data.cache_dir={tmp_path}",
            "--data.num_workers=2", "--trainer.num_sanity_val_steps=1"]  # fmt: skip
    probe = ["--trainer.callbacks+=tests.probes.SignalWithWorkers", f"--trainer.callbacks.step={step}",
             f"--trainer.callbacks.signum={signum}"]  # fmt: skip
    args = [*quick_args(tmp_path, steps=20, every=10), *data, *probe]
    result = run_lmheads("fit", *args, cwd=tmp_path, new_python=True)  # workers forked from the command
    assert result.returncode == 128 + signum, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    if step == -1:
        last = result.stderr.strip().splitlines()[-1]
        assert last == f"interrupted: {signum.name} outside training: nothing was saved"
        assert not (tmp_path / "quickstart").exists()
    else:
        assert f"interrupted: {signum.name} at step {step}: saved" in result.stderr
        assert (only_run(tmp_path) / "checkpoints" / "interrupted.ckpt").is_file()


def test_float16_weights_diverge_at_once_and_the_error_names_the_precision(tmp_path, capsys):
    """16-true: float16 AdamW state rounds eps and small squared gradients to 0, so the first update
    divides by zero; lowering the learning rate would not help, and the error says what does."""
    with pytest.raises(SystemExit) as exc:
        fit(tmp_path, "--trainer.precision=16-true", "--trainer.logger=false", steps=4, every=2)
    assert exc.value.code == 3
    err = capsys.readouterr().err
    assert "NaN or infinite at step 1" in err and "Train in 16-mixed or bf16-mixed: with 16-true" in err


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        fit(
            tmp_path,
            "--trainer.callbacks+=tests.probes.PoisonAt",
            "--trainer.callbacks.step=4",
            steps=8,
            every=2,
        )
    assert exc.value.code == 3
    err = capsys.readouterr().err
    assert "became NaN or infinite at step 4" in err and "Lower model.lr" in err and "16-mixed" not in err
    checkpoints = only_run(tmp_path) / "checkpoints"
    assert "last.ckpt" in {p.name for p in checkpoints.iterdir()}
    for path in checkpoints.iterdir():
        state = torch.load(path, map_location="cpu", weights_only=False)
        assert state["global_step"] <= 4  # nothing written after the loss went bad
        assert all(torch.isfinite(w).all() for w in state["state_dict"].values())
    # the run records that it diverged, and a comparison leaves it out rather than read it as stopped early
    assert json.loads((checkpoints.parent / "diverged.json").read_text())["step"] == 4
    fit(tmp_path, "--seed_everything=1", steps=8, every=2)
    compare = tool("compare")
    assert compare.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Diverged (training loss NaN or infinite; not in the tables): tied seed 0 at step 4" in out
    assert "| tied | 1 |" in out and "Budget: 8 steps" in out  # seed 1 alone


def test_last_checkpoint_is_the_last_validation_whatever_the_metric_did(tmp_path):
    """A run whose validations get worse after the first, killed (SIGKILL, nothing saved on the way out)
    after its third: ``last.ckpt`` is that third validation's state, not the best one's."""
    result = run_lmheads(
        "fit", *quick_args(tmp_path, steps=12, every=2),
        "--trainer.callbacks+=tests.probes.WorseningValidation",
        "--trainer.callbacks+=tests.probes.SignalAt", "--trainer.callbacks.step=7",
        f"--trainer.callbacks.signum={int(signal.SIGKILL)}",
        cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    checkpoints = only_run(tmp_path) / "checkpoints"
    steps = {p.name: torch.load(p, weights_only=False)["global_step"] for p in checkpoints.glob("*.ckpt")}
    assert steps == {"step2.ckpt": 2, "last.ckpt": 6}


@pytest.mark.skipif(
    not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tempfile.gettempdir()).st_dev,
    reason="needs a temporary folder on another file system (/dev/shm)",
)
@pytest.mark.parametrize("dies_in", ["copy", "write"])
def test_a_save_that_dies_midway_leaves_no_partial_checkpoint(tmp_path, monkeypatch, dies_in):
    """The temporary folder on another file system than the run (a tmpfs TMPDIR), and the process dies
    while a checkpoint is written, or while a staged one is copied into place: no file is left under the
    checkpoint's name (a partial one would be taken for the run's state)."""
    cli = main([*quick_args(tmp_path), "--trainer.logger=false"], run=False)
    monkeypatch.setattr(tempfile, "tempdir", tempfile.mkdtemp(dir="/dev/shm"))

    def copy_half(source, target, *args, **kwargs):
        Path(target).write_bytes(Path(source).read_bytes()[:1000])
        raise KeyboardInterrupt  # the process ends here

    real_save = torch.save

    def save_half(obj, file, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        file.write(buffer.getvalue()[:1000])
        raise KeyboardInterrupt

    if dies_in == "copy":
        monkeypatch.setattr(shutil, "copyfile", copy_half)
        monkeypatch.setattr(shutil, "copy2", copy_half)
    else:
        monkeypatch.setattr(torch, "save", save_half)
    target = tmp_path / "checkpoints" / "step5.ckpt"
    with contextlib.suppress(KeyboardInterrupt):  # a writer that copies nothing never gets to die there
        cli.trainer.strategy.checkpoint_io.save_checkpoint({"global_step": 5, "w": torch.ones(4096)}, target)
    # whole (a writer that copies nothing finished) or absent, never partial; and nothing else by that name
    assert not target.exists() or torch.load(target, weights_only=True)["global_step"] == 5
    assert [p.name for p in target.parent.glob("*.ckpt")] == ["step5.ckpt"] * target.exists()
    shutil.rmtree(tempfile.tempdir)


@pytest.mark.parametrize("over_it", [False, True])
def test_a_full_disk_at_a_checkpoint_stops_in_one_line_and_the_run_continues(
    tmp_path, monkeypatch, capsys, over_it
):
    """The disk fills while a validation's checkpoint is written: training stops with one ``error:`` line
    (exit status 4) that names the step and the checkpoint to continue from, leaves no partial file and
    the earlier ``last.ckpt`` whole, and the run continues from it to its end. torch's writer raises a
    RuntimeError over the file's OSError (``over_it``)."""
    real_save = torch.save

    def fills_the_disk(obj, file, *args, **kwargs):
        if obj.get("global_step") == 4:
            file.write(b"part of a checkpoint")
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                if over_it:
                    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from None
                raise
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fills_the_disk)
    with pytest.raises(SystemExit) as exc:
        fit(tmp_path, steps=6, every=2)
    checkpoints = only_run(tmp_path) / "checkpoints"
    last = checkpoints / "last.ckpt"
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 4 and len(errors) == 1, errors
    assert (
        "could not be written (No space left on device); training stopped at step 4. Free space there"
        in errors[0]
    )
    assert errors[0].endswith(f"then continue the run with --ckpt_path={last} (an earlier state)")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step2.ckpt"]
    assert torch.load(last, weights_only=False)["global_step"] == 2
    monkeypatch.setattr(torch, "save", real_save)
    fit(tmp_path, f"--ckpt_path={last}", steps=6, every=2)
    assert json.loads((only_run(tmp_path) / "results.json").read_text())["step"] == 6


def test_a_full_disk_at_the_first_checkpoint_says_how_to_start_the_run_again(tmp_path, monkeypatch, capsys):
    """With no checkpoint to continue from, the run's folder is claimed by a run that stopped before its
    first checkpoint: the same command again is refused, so the line says what starts it again."""

    def fills_the_disk(obj, file, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", fills_the_disk)
    with pytest.raises(SystemExit):
        fit(tmp_path, "--trainer.logger.init_args.version=r", steps=4, every=2)
    run = tmp_path / "quickstart" / "r"
    assert (
        capsys.readouterr()
        .err.rstrip()
        .endswith(
            f"then start it again (no checkpoint was written before): delete {run}, or give another "
            "--trainer.logger.init_args.version"
        )
    )


def test_a_full_disk_under_the_logs_stops_in_one_line_and_the_run_continues(tmp_path, monkeypatch, capsys):
    """TensorBoard's writer thread runs out of space: its traceback, then Lightning's "you tried to log
    ... which is currently not supported" and a traceback, were all the command said. It stops with one
    ``error:`` line (exit status 4) naming the run and the checkpoint to continue from, as for a
    checkpoint, and the run continues from it."""
    from tensorboard.summary.writer.record_writer import RecordWriter

    run = tmp_path / "quickstart" / "r"
    last = run / "checkpoints" / "last.ckpt"
    real_write = RecordWriter.write

    def fills_the_disk(self, data):
        if last.is_file():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(RecordWriter, "write", fills_the_disk)
    with pytest.raises(SystemExit) as exc:
        fit(tmp_path, "--trainer.logger.init_args.version=r", steps=6, every=2)
    err = capsys.readouterr().err
    assert exc.value.code == 4 and "Traceback" not in err and "Exception in thread" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: {run} could not be written (No space left on device); the command stopped. Free space "
        f"there, then continue the run with --ckpt_path={last} (an earlier state)"
    ]
    monkeypatch.setattr(RecordWriter, "write", real_write)
    fit(tmp_path, "--trainer.logger.init_args.version=r", f"--ckpt_path={last}", steps=6, every=2)
    assert json.loads((run / "results.json").read_text())["step"] == 6
    monkeypatch.setattr(RecordWriter, "write", fills_the_disk)  # an evaluation leaves nothing to continue
    with pytest.raises(SystemExit) as exc:
        main(["validate", *quick_args(tmp_path), f"--ckpt_path={last}"])
    err = capsys.readouterr().err
    assert exc.value.code == 4 and f"error: {run / 'validate' / 'last'} could not be written (No space" in err
    assert err.rstrip().endswith("Free space there, then run it again") and not (run / "validate").exists()


def test_a_full_disk_at_the_end_of_training_is_one_line_and_leaves_no_partial_results(
    tmp_path, monkeypatch, capsys
):
    """The disk fills as ``results.json`` is written: one ``error:`` line (exit status 4) saying that
    training ended and its checkpoints are whole, no partial ``results.json`` (which no report could
    parse), and the reports read the run from its logs."""
    real_write = Path.write_text

    def fills_the_disk(self, data, *args, **kwargs):
        if "results.json" in self.name:
            real_write(self, data[:10], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", fills_the_disk)
    with pytest.raises(SystemExit) as exc:
        fit(tmp_path, steps=4, every=2)
    monkeypatch.undo()
    run = only_run(tmp_path)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 4
    assert errors == [
        f"error: {run / 'results.json'} could not be written (No space left on device); training ended at "
        "step 4 and its checkpoints are whole (the reports read the run from its logs without it). "
        "Free space there"
    ]
    assert not [p.name for p in run.iterdir() if "results" in p.name]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    assert tool("compare").main([str(tmp_path)]) == 0
    assert "| tied | 0 |" in capsys.readouterr().out


def test_a_full_disk_at_the_start_is_one_line_and_leaves_no_folder(tmp_path, monkeypatch, capsys):
    """The disk is full when the run's config.yaml is written, before training: one ``error:`` line
    naming the file, and nothing left of the failed start."""
    import jsonargparse

    def fills_the_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(jsonargparse.ArgumentParser, "save", fills_the_disk)
    with pytest.raises(SystemExit) as exc:
        fit(tmp_path, steps=2, every=2)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(errors) == 1, errors
    assert errors[0].startswith(f"error: {tmp_path / 'quickstart'}")
    assert errors[0].endswith(
        "config.yaml could not be written (No space left on device); free space there, or give another "
        "trainer.logger.init_args.save_dir (or default_root_dir)"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_as_an_evaluation_is_filed_is_one_line_and_files_nothing(tmp_path, monkeypatch, capsys):
    """``test`` of a run's checkpoint on a full disk: its ``checkpoint.json`` cannot be written, which is
    one ``error:`` line, and the run holds no evaluation folder afterwards."""
    fit(tmp_path, steps=2, every=2)
    run = only_run(tmp_path)
    before = sorted(p.name for p in run.iterdir())
    real_write = Path.write_text

    def fills_the_disk(self, data, *args, **kwargs):
        if "checkpoint.json" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", fills_the_disk)
    with pytest.raises(SystemExit) as exc:
        main(["test", *quick_args(tmp_path), f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2
    assert errors == [
        f"error: {run / 'test' / 'last' / 'checkpoint.json'} could not be written (No space left on device); "
        "free space there"
    ]
    assert sorted(p.name for p in run.iterdir()) == before


def test_checkpoint_of_another_head_or_vocabulary(tmp_path, capsys, caplog):
    fit(tmp_path, steps=2, every=2)
    ckpt = only_run(tmp_path) / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match=r"missing from the checkpoint: \['head.weight'\].*another head"):
        LMHeadModule.load_from_checkpoint(ckpt, head=UntiedHead())
    with pytest.raises(SystemExit) as exc, caplog.at_level("INFO"):
        main(["validate", *quick_args(tmp_path), f"--ckpt_path={ckpt}", "--data.init_args.vocab_size=512"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "does not fit this model" in err and "(1024, 32) in the checkpoint, (512, 32) here" in err
    assert "filed in" not in caplog.text  # refused: nothing is filed, and nothing says it was
    assert not (ckpt.parent.parent / "validate").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a checkpoint", "cannot be read"),
        (None, "does not exist; check --ckpt_path"),
        ("a run", "bad.ckpt' is a folder; give a checkpoint file in --ckpt_path (this run's last: {last})"),
    ],
)
def test_corrupt_or_missing_checkpoint(tmp_path, capsys, content, message):
    path = tmp_path / "bad.ckpt"
    if content == "a run":  # a run's folder, which export and harness take for its last.ckpt
        (path / "checkpoints").mkdir(parents=True)
        (path / "checkpoints" / "last.ckpt").write_bytes(b"")
        message = message.format(last=path / "checkpoints" / "last.ckpt")
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as exc:
        main(["validate", *quick_args(tmp_path), f"--ckpt_path={path}"])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def _lr(run) -> dict[int, float]:
    return dict(scalars(run)["lr-AdamW/pg1"])  # the learning rate each step trained with


def test_continuing_a_finished_run_keeps_its_learning_rate_schedule(tmp_path, caplog):
    """A 6-step run continued to 10 trains steps 6-9 at its final learning rate, not on a cosine rebuilt
    for 10 steps (which would jump back up); the run, its hparams and compare's budget line say so."""
    schedule = WarmupCosine(warmup=2, total=6, min_ratio=0.1)
    fit(tmp_path, "--model.warmup_steps=2", steps=6, every=3)
    run = only_run(tmp_path)
    with caplog.at_level("INFO"):
        fit(tmp_path, "--model.warmup_steps=2", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}", steps=10)
    lr = _lr(run)
    assert sorted(lr) == list(range(10))
    for step, value in lr.items():
        assert value == pytest.approx(3e-3 * schedule(step), rel=1e-6), step
    assert lr[6] == lr[9] == pytest.approx(3e-4)  # min_lr_ratio x lr, where the 6-step run ended
    assert "decays over the first 6 steps (the schedule this run started with)" in caplog.text
    assert (run / "hparams.yaml").read_text().count("lr_decay_steps: 6\n") == 1
    compare = tool("compare")
    budget = compare.budget({"tied": runlog.find_runs([tmp_path])})
    assert budget.endswith("; the learning rate decayed over the first 6 steps, then held at its minimum")


def test_a_continuation_logs_its_learning_rate_at_the_step_it_trains(tmp_path):
    """Validated every 2 steps, then continued validating every 3: Lightning's logging step starts one
    behind, and its learning-rate monitor logs before the module's hooks; each step gets one value."""
    fit(tmp_path, "--model.warmup_steps=4", steps=2, every=2)
    run = only_run(tmp_path)
    fit(tmp_path, "--model.warmup_steps=4", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}", steps=4)
    logged = scalars(run)["lr-AdamW/pg1"]
    assert [step for step, _ in logged] == [0, 1, 2, 3]
    schedule = WarmupCosine(warmup=4, total=4, min_ratio=0.1)
    assert [value for _, value in logged] == pytest.approx([3e-3 * schedule(s) for s in range(4)], rel=1e-6)


def test_part_of_a_longer_schedule_continues_as_one_run(tmp_path, caplog):
    """``lr_decay_steps`` plans the schedule of a longer run: 4 of 8 steps now and the rest later end
    where an 8-step run does, bitwise, after warmup too."""
    straight = fit(tmp_path / "straight", DROPOUT, "--model.warmup_steps=2", steps=8, every=4)
    planned = [DROPOUT, "--model.warmup_steps=2", "--model.lr_decay_steps=8"]
    with caplog.at_level("INFO"):
        fit(tmp_path / "parts", *planned, steps=4, every=4)
    assert "this run stops at step 4 of the 8 its schedule decays over" in caplog.text
    run = only_run(tmp_path / "parts")
    assert (
        tool("compare")
        .budget({"tied": tool("compare").find_runs([run])})
        .endswith("; stopped at step 4 of its 8-step learning-rate schedule")
    )
    last = run / "checkpoints" / "last.ckpt"
    resumed = fit(tmp_path / "parts", *planned, f"--ckpt_path={last}", steps=8, every=4).model
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert _lr(run) == _lr(only_run(tmp_path / "straight"))
    with pytest.raises(ConfigError, match=r"lr_decay_steps=2 leaves nothing to decay after warmup_steps=2"):
        LMHeadModule(vocab_size=16, warmup_steps=2, lr_decay_steps=2)


def test_export_safetensors_round_trip(tmp_path):
    from lmheads.export import export_safetensors, load_safetensors

    cli = fit(tmp_path, "--model.head=tied_bias", steps=2, every=2)
    model = cli.model.eval()
    path = tmp_path / "model.safetensors"
    assert export_safetensors(model, path) == {}  # the tie is not an alias: the embedding is stored once
    again = load_safetensors(path).eval()
    idx = torch.randint(0, 1024, (2, 16))
    torch.testing.assert_close(again(idx), model(idx), rtol=0, atol=0)
    form = again.head.linear_form(torch.zeros(1, 128), again.backbone.wte)
    assert form.weight is again.backbone.wte.weight  # still tied


def test_export_gives_aliases_one_owner(tmp_path):
    """A head that registers the embedding itself (a broken alias elsewhere) still exports and reloads."""
    from lmheads.backbone import BackboneConfig
    from lmheads.export import export_safetensors, load_safetensors
    from tests.external_heads import CosineTiedHead

    model = LMHeadModule(
        head=CosineTiedHead(), backbone=BackboneConfig(n_layer=1, d_model=16, n_head=2), vocab_size=50
    )
    model.head.register_parameter("alias", model.backbone.wte.weight)
    path = tmp_path / "aliased.safetensors"
    assert export_safetensors(model, path) == {"head.alias": "backbone.wte.weight"}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        stored = set(f.keys())
    assert "head.alias" not in stored and "backbone.wte.weight" in stored  # one owner
    again = load_safetensors(path)  # rebuilt from its spec, without the ad-hoc alias
    idx = torch.randint(0, 50, (2, 8))
    torch.testing.assert_close(again(idx), model(idx), rtol=0, atol=0)


def test_export_tool(tmp_path, capsys, monkeypatch):
    fit(tmp_path, steps=2, every=2)
    ckpt = only_run(tmp_path) / "checkpoints" / "last.ckpt"
    export, out = tool("export"), tmp_path / "m.safetensors"
    assert export.main([str(ckpt), str(out)]) == 0
    assert "reloaded logits identical" in capsys.readouterr().out
    # an existing file is not replaced unless asked, and bad input is one line with nothing written
    before = out.read_bytes()
    assert export.main([str(ckpt), str(out)]) == 2
    assert f"error: {out} exists; give another output path, or --overwrite" in capsys.readouterr().err
    assert export.main([str(tmp_path / "missing.ckpt"), str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "does not exist; give a checkpoint file or a run folder" in err
    assert not (tmp_path / "x.safetensors").exists()
    assert export.main([str(ckpt), str(tmp_path / "no" / "x.safetensors")]) == 2
    assert f"error: {tmp_path / 'no'} is not a folder; create it" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert export.main([str(ckpt.parent.parent), str(out), "--overwrite"]) == 0  # the run: its last.ckpt
    assert sorted(p.name for p in tmp_path.glob("*safetensors*")) == ["m.safetensors"]  # no partial left
    # a full disk, which safetensors reports as its own error, is one line and leaves the file as it was
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    before = out.read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert export.main([str(ckpt), str(out), "--overwrite"]) == 2
    assert capsys.readouterr().err == (
        f"error: {out} could not be written (No space left on device); free space there, or give another "
        "output path; nothing was written\n"
    )
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.glob("*safetensors*")) == [out.name]


def test_every_process_continues_the_gpu_random_state_of_rank_zero_on_its_own_device(monkeypatch):
    """The processes of a run draw one random stream each on its own GPU; the checkpoint holds rank 0's
    (its device's), and each process continues it on its device, not on the device of the same number
    in rank 0's process (which rank 0 never drew from). A checkpoint that kept every visible device's
    state, resumed where fewer are visible, restores the state of the process's own device, or none."""
    model = LMHeadModule(vocab_size=16, backbone={"n_layer": 1, "n_head": 1, "d_model": 8, "block_size": 4})
    checkpoint: dict = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    drawn = torch.full((16,), 7, dtype=torch.uint8)  # rank 0's device's state
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": drawn)
    model.on_save_checkpoint(checkpoint)
    assert torch.equal(checkpoint["lmheads_rng"]["cuda"], drawn)
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((device, state)))
    model._trainer = object()  # resuming
    older = [torch.full((16,), i, dtype=torch.uint8) for i in range(2)]  # two devices visible when saved
    for rank_device, cuda, expected in (
        (1, drawn, drawn),
        (1, older, older[1]),
        (0, older, older[0]),
        (2, older, None),
    ):
        monkeypatch.setattr(torch.cuda, "current_device", lambda device=rank_device: device)
        restored.clear()
        model.on_load_checkpoint({**checkpoint, "lmheads_rng": {**checkpoint["lmheads_rng"], "cuda": cuda}})
        if expected is None:
            assert restored == []
        else:
            assert (
                len(restored) == 1 and restored[0][0] == rank_device and torch.equal(restored[0][1], expected)
            )


@pytest.mark.slow
def test_ctrl_c_with_the_output_pipe_closed_still_saves(tmp_path):
    """`fit ... | tee log` and Ctrl-C: the pipe's reader is gone before the signal is handled. Writes to
    the closed pipe are dropped; the checkpoint is written and the exit status is Ctrl-C's."""
    args = ["fit", *quick_args(tmp_path, steps=40, every=20), "--trainer.enable_progress_bar=true",
            "--trainer.callbacks+=tests.probes.SignalAt", "--trainer.callbacks.step=3"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "lmheads", *args], cwd=tmp_path, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    process.stdout.close()  # the reader of stdout is gone from the start
    err = process.stderr.read()
    assert process.wait(timeout=300) == 130, err[-3000:]
    assert (only_run(tmp_path) / "checkpoints" / "interrupted.ckpt").is_file()
    assert "interrupted: SIGINT at step 3" in err and "BrokenPipeError" not in err
