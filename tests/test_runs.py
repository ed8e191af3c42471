"""Runs as records: no silent override by a checkpoint, one run per folder, evaluations filed with their
run, nothing left by a failed start, a summary at the end (lmheads.run and the CLI
around them)."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import signal
import socket
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import Namespace

from lmheads import comparable, console, runlog
from lmheads.errors import ConfigError
from lmheads.heads import head_name, registered_heads
from lmheads.run.claim import RunFolder
from lmheads.run.plan import Plan, point_loggers
from lmheads.run.resume import training_conflicts

from . import external_heads
from .helpers import (
    QUICKSTART,
    ROOT,
    SLURM,
    fit,
    held_elsewhere,
    main,
    only_run,
    quick_args,
    run_lmheads,
    scalars,
    tool,
    two_loggers,
)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under a folder with a hash of its content."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def refused(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    return err


@pytest.fixture
def finished_run(tmp_path):
    """A tied run of 6 steps, and a snapshot of its folder."""
    fit(tmp_path, steps=6, every=3)
    run = only_run(tmp_path)
    return tmp_path, run, snapshot(run)


def test_options_contradicting_the_checkpoint_are_refused_and_the_run_is_untouched(finished_run, capsys):
    tmp_path, run, before = finished_run
    last = f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    capsys.readouterr()
    for command in ("fit", "validate"):
        err = refused(
            capsys, command, *quick_args(tmp_path, steps=10), "--model.head=untied", "--model.lr=0.01", last
        )
        assert (
            "model.head.class_path: 'lmheads.heads.untied.UntiedHead' here, 'lmheads.heads.tied.TiedHead'"
            in err
        )
        assert "model.lr: 0.01 here, 0.003 in the checkpoint" in err
    for steps in (5, 0):
        err = refused(capsys, "fit", *quick_args(tmp_path, steps=steps), last)
        assert f"is at step 6 and trainer.max_steps={steps}: nothing to train" in err
    # Lightning restores no data option: a resume on other data would silently continue on it
    err = refused(capsys, "fit", *quick_args(tmp_path, steps=10), "--data.init_args.batch_size=16", last)
    assert "was trained on other data: data.batch_size: 16 here, 32 in the checkpoint" in err
    main(["validate", *quick_args(tmp_path), "--data.init_args.batch_size=16", last])  # evaluating: any data
    assert {k: v for k, v in snapshot(run).items() if not k.startswith("validate/")} == before
    assert [p.name for p in (tmp_path / "quickstart").iterdir()] == [run.name]


def test_an_option_given_at_its_default_that_contradicts_the_checkpoint_is_refused(tmp_path, capsys):
    """``--model.head=tied`` is lmheads' default, and the quickstart's config file names it too: with an
    untied run's checkpoint, either is refused rather than replaced by the checkpoint's head."""
    fit(tmp_path, "--model.head=untied", steps=2, every=2)
    run = only_run(tmp_path)
    before = snapshot(run)
    last = f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    capsys.readouterr()
    for command in ("fit", "validate"):
        for given in (["--model.head=tied"], []):  # on the command line; in the config file alone
            err = refused(capsys, command, *quick_args(tmp_path, steps=4, every=2), *given, last)
            assert "model.head.class_path: 'lmheads.heads.tied.TiedHead' here, " in err
            assert f"put --config {run / 'config.yaml'} before --ckpt_path" in err
    assert snapshot(run) == before
    # the run's own configuration, or the head given again, agree with the checkpoint
    main(["validate", *quick_args(tmp_path), f"--config={run / 'config.yaml'}", last])
    main(["validate", *quick_args(tmp_path), "--model.head=untied", last])
    assert len(list((run / "validate").iterdir())) == 2


def test_a_fit_of_no_steps_is_refused_and_leaves_no_run(tmp_path, capsys):
    for zero in (["--trainer.max_steps=0"], ["--trainer.max_steps=-1", "--trainer.max_epochs=0"]):
        err = refused(capsys, "fit", *quick_args(tmp_path), *zero)
        assert f"{zero[-1].removeprefix('--')} trains nothing" in err
    assert not (tmp_path / "quickstart").exists()


def test_a_run_whose_time_limit_is_spent_is_not_continued_with_it(tmp_path, capsys):
    """Lightning's max_time counts the run's training time, not this start's: a run that used its time
    would train nothing and rewrite its record, so the command is refused; a longer limit continues it."""
    hours = "--trainer.max_time=00:01:00:00"
    fit(tmp_path, hours, steps=2, every=2)
    run = only_run(tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    state["callbacks"]["Timer"]["time_elapsed"]["train"] = 3601.0  # as after an hour of training
    torch.save(state, last)
    before = snapshot(run)
    err = refused(capsys, "fit", *quick_args(tmp_path), hours, f"--ckpt_path={last}", "--trainer.max_steps=4")
    assert "has trained for 3601 s and trainer.max_time=00:01:00:00 counts that time" in err
    assert "00:02:00:01 for an hour more" in err and snapshot(run) == before
    fit(tmp_path, "--trainer.max_time=00:02:00:00", f"--ckpt_path={last}", steps=4, every=2)
    assert json.loads((run / "results.json").read_text())["step"] == 4


def test_a_run_that_trained_its_epochs_is_not_continued_with_them(tmp_path, capsys):
    """Its last step validated mid-loop, Lightning would train a batch past the end; nothing is meant."""
    epochs = ["--trainer.max_steps=-1", "--trainer.max_epochs=1", "--data.init_args.train_tokens=8192"]
    fit(tmp_path, *epochs, every=3)  # 4 batches, validated at 3 and (as the last step) 4
    run = only_run(tmp_path)
    before = snapshot(run)
    err = refused(
        capsys, "fit", *quick_args(tmp_path), *epochs, f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    )
    assert "has trained 1 epoch and trainer.max_epochs=1: nothing to train" in err and snapshot(run) == before


def test_a_continuation_without_a_validation_keeps_the_metrics_of_the_last(tmp_path, capsys):
    fit(tmp_path, steps=2, every=2)
    run = only_run(tmp_path)
    first = json.loads((run / "results.json").read_text())
    capsys.readouterr()
    last = f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    fit(tmp_path, last, "--trainer.limit_val_batches=0", steps=3, every=2)  # trains step 3, validates none
    results = json.loads((run / "results.json").read_text())
    assert (results["step"], results["validated_at"]) == (3, 2) and results["metrics"] == first["metrics"]
    assert "  (of step 2, the last validation)\n" in capsys.readouterr().out


def test_testing_data_without_a_test_split_says_what_to_give_and_files_nothing(tmp_path, capsys):
    text = tmp_path / "a.txt"
    text.write_text("\n".join(" ".join(["alpha", "beta", "gamma"][(i * j) % 3] for j in range(9))
                              for i in range(2000)) + "\n")  # fmt: skip
    data = ["--data=lmheads.data.TextDataModule", "--data.tokenizer=word", f"--data.train_file={text}",
            f"--data.cache_dir={tmp_path}", "--model.backbone.block_size=16"]  # fmt: skip
    fit(tmp_path, *data, steps=2, every=2)
    run = only_run(tmp_path)
    capsys.readouterr()
    err = refused(
        capsys, "test", *quick_args(tmp_path), *data, f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    )
    assert "error: the data has no test split: with text files give data.test_file" in err
    assert not (run / "test").exists()


def test_given_options_names_what_the_command_line_and_its_config_files_set(tmp_path):
    from lmheads.cmdline import given_options

    config = tmp_path / "c.yaml"
    config.write_text(
        "model:\n  lr: 0.001\n  head:\n    class_path: TiedHead\n    init_args:\n      bias: true\n"
    )
    top = tmp_path / "top.yaml"
    top.write_text("fit:\n  model:\n    backbone:\n      n_layer: 2\n")
    args = [f"--config={top}", "fit", "--config", str(config), "--model.head.init_args.logit_scale=2",
            "--model.warmup_steps", "3", "--data.init_args.batch_size=4"]  # fmt: skip
    assert given_options(args, "model", "fit") == [
        "backbone.n_layer", "lr", "head.class_path", "head.bias", "head.logit_scale", "warmup_steps"
    ]  # fmt: skip
    assert given_options(["fit", "--model", "some.Module"], "model", "fit") == [""]  # the whole section
    # and its keys where the value is YAML, or a file of it
    inline = "{lr: 0.1, head: {init_args: {bias: true}}}"
    assert given_options(["fit", "--model", inline], "model", "fit") == ["", "lr", "head.bias"]
    assert given_options(["fit", "--config", "{model: {head: untied}}"], "model", "fit") == ["head"]


def test_a_resume_reads_the_same_text_wherever_it_lies(tmp_path, capsys):
    """A data file counts by what it holds: a copy elsewhere continues the run, an edited one is refused."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    text = "\n".join(" ".join(words[(i * j) % 6] for j in range(10)) for i in range(3000)) + "\n"
    original, moved = tmp_path / "a.txt", tmp_path / "elsewhere" / "a.txt"
    original.write_text(text)
    data = ["--data=lmheads.data.TextDataModule", "--data.tokenizer=word", f"--data.cache_dir={tmp_path}"]
    fit(tmp_path, *data, f"--data.train_file={original}", steps=2, every=2)
    last = only_run(tmp_path) / "checkpoints" / "last.ckpt"
    moved.parent.mkdir()
    shutil.copy(original, moved)
    fit(tmp_path, *data, f"--data.train_file={moved}", f"--ckpt_path={last}", steps=4, every=2)
    moved.write_text(text + "alpha beta\n")
    capsys.readouterr()
    args = [
        *quick_args(tmp_path, steps=6, every=2),
        *data,
        f"--data.train_file={moved}",
        f"--ckpt_path={last}",
    ]
    err = refused(capsys, "fit", *args)
    assert f"data.train_file: '{moved}' holds other text than '{moved}' held when the checkpoint's run" in err


def test_a_dataset_counts_by_the_text_it_holds(tmp_path, capsys):
    """A dataset given by name (a hub name, or a local dataset folder) can hold other text under that name:
    the digest of its text is the run's ``data/train_sha256``, and a fit continued on other text is
    refused and leaves the run as it was (the continuation's event file and configuration too); a test
    of other test text is filed as other data."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    rows = [{"text": " ".join(words[(i * j) % 6] for j in range(10))} for i in range(3000)]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    data = ["--data=lmheads.data.TextDataModule", "--data.tokenizer=word", f"--data.dataset_name={corpus}",
            f"--data.cache_dir={tmp_path}"]  # fmt: skip
    for split in ("train", "test"):
        (corpus / f"{split}.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    fit(tmp_path / "runs", *data, steps=2, every=2)
    run = only_run(tmp_path / "runs")
    assert len(yaml.safe_load((run / "hparams.yaml").read_text())["data/train_sha256"]) == 64
    rows[1], rows[2] = rows[2], rows[1]  # the same words, in another order
    (corpus / "train.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    before = snapshot(run)
    args = [
        *quick_args(tmp_path / "runs", steps=4, every=2),
        *data,
        f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
    ]
    err = refused(capsys, "fit", *args)
    assert (
        f"data.dataset_name '{corpus}' holds other train text than when the checkpoint's run read it" in err
    )
    assert snapshot(run) == before
    (corpus / "test.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    main(["test", *args])
    other = json.loads((run / "test" / "last" / "checkpoint.json").read_text())["other_data"]
    assert other == [f"data.dataset_name '{corpus}': other test text than when the checkpoint's run read it"]


def test_a_command_from_a_checkpoint_that_fails_before_its_first_step_leaves_the_run_as_it_was(finished_run):
    """Once Lightning has restored the checkpoint, the step is the run's: a continuation (or a test of the
    checkpoint) that fails then has trained nothing, and leaves no trace in the run."""
    tmp_path, run, before = finished_run
    last = f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    for command, steps, at in (("fit", 9, 6), ("test", 6, 0)):  # (an evaluation's global_step is 0)
        with pytest.raises(RuntimeError, match=f"a failure at step {at}, before training"):
            main(
                [
                    command,
                    *quick_args(tmp_path, steps=steps),
                    "--trainer.callbacks+=tests.probes.FailOnStart",
                    last,
                ]
            )
        assert snapshot(run) == before


def test_a_test_counts_its_file_by_the_text_it_holds(tmp_path, caplog):
    """The run's test is of the test file it read: a copy elsewhere is the same test, and the file edited
    in place is other data (filed, said, and not the run's test in compare.py)."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    text = "\n".join(" ".join(words[(i * j) % 6] for j in range(10)) for i in range(3000)) + "\n"
    files = {split: tmp_path / f"{split}.txt" for split in ("train", "test")}
    for path in files.values():
        path.write_text(text)
    data = ["--data=lmheads.data.TextDataModule", "--data.tokenizer=word", f"--data.cache_dir={tmp_path}",
            f"--data.train_file={files['train']}"]  # fmt: skip
    fit(tmp_path, *data, f"--data.test_file={files['test']}", steps=2, every=2)
    run = only_run(tmp_path)
    copy = tmp_path / "elsewhere" / "test.txt"
    copy.parent.mkdir()
    shutil.copy(files["test"], copy)
    files["test"].write_text(text.replace("alpha", "beta"))
    last = f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    for test_file in (copy, files["test"]):
        main(["test", *quick_args(tmp_path), *data, f"--data.test_file={test_file}", last])
    records = [
        json.loads((run / "test" / name / "checkpoint.json").read_text()) for name in ("last", "last-2")
    ]
    assert records[0]["other_data"] == []
    edited = f"'{files['test']}'"
    assert records[1]["other_data"] == [
        f"data.test_file: {edited} holds other text than {edited} held when the checkpoint's run read it"
    ]


def test_the_text_harness_scores_counts_by_its_content(tmp_path):
    """``harness`` files its default task as the run's own where it scores the test file the run read: a
    copy given as ``--text`` too, not that file edited since."""
    from lmheads.data.base import file_digest
    from lmheads.harness import other_text

    text, copy = tmp_path / "test.txt", tmp_path / "copy.txt"
    for path in (text, copy):
        path.write_text("the cat sat\n")
    read = file_digest(text)
    assert (
        other_text(text, False, read) == other_text(copy, True, read) == other_text(None, False, read) == []
    )
    text.write_text("the dog sat\n")
    assert other_text(text, False, read) == [
        f"data.test_file: '{text}' holds other text than when the run read it"
    ]
    assert other_text(text, True, read) == [f"text={text}"]
    assert other_text(copy, True, None) == [f"text={copy}"]  # a run that read no test file
    assert other_text(text, False, None) == []  # nor a digest of it (a checkpoint from before they were kept)


def test_resuming_continues_in_the_run_and_keeps_its_record(finished_run):
    tmp_path, run, before = finished_run
    cli = fit(tmp_path, f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}", steps=9, every=3)
    assert Path(cli.trainer.logger.log_dir).resolve() == run.resolve()
    after = snapshot(run)
    assert after["config.yaml"] == before["config.yaml"] and after["hparams.yaml"] == before["hparams.yaml"]
    assert any(name.startswith("config-resumed-step6-") for name in after)
    assert not (run / "checkpoints" / "last-v1.ckpt").exists()  # last.ckpt is the run's latest state
    assert [s for s, _ in scalars(run)["val/loss"]] == [2, 5, 8]
    hp = [v for _, v in scalars(run)["hp/val_loss"]]
    assert sum(math.isnan(v) for v in hp) == 1 and len(hp) == 4  # no second placeholder from the resume


def test_a_run_continues_with_the_batch_and_precision_it_trained_with(finished_run, capsys):
    """Lightning restores no trainer option: continuing a run with gradient accumulation, another
    precision or clipping would change how it trains, another seed what its record says (the resume
    restores the run's random state). Refused; devices traded for accumulation keep the budget."""
    tmp_path, run, before = finished_run
    last = f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    capsys.readouterr()
    err = refused(
        capsys, "fit", *quick_args(tmp_path, steps=8, every=4), last, "--trainer.accumulate_grad_batches=2",
        "--trainer.precision=bf16-mixed", "--trainer.gradient_clip_val=0.5", "--seed_everything=3",
    )  # fmt: skip
    assert (
        "error: the run trained 2,048 tokens a step (1 device(s) x accumulate_grad_batches=1), this start "
        "would train 4,096 tokens a step (1 device(s) x accumulate_grad_batches=2); precision: 32-true in "
        "the run, bf16-mixed here; gradient_clip_val: 0.0 in the run, 0.5 here; seed: 0 in the run, 3 here. "
        "Continuing would change how the run trains or what its record says" in err
    )
    assert snapshot(run) == before
    now = {"tokens_per_step": 2048, "devices": 2, "accumulate_grad_batches": 1, "precision": "32-true"}
    now |= {"seed": 0, "gradient_clip_val": 0.0, "gradient_clip_algorithm": "none"}
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())
    assert hparams["gradient_clip_algorithm"] == "none"
    (run / "hparams.yaml").write_text(yaml.safe_dump({**hparams, "devices": 1, "accumulate_grad_batches": 2}))
    assert training_conflicts(run, now) == []  # 1 device x 2 batches, continued on 2 devices x 1
    # clipped by norm, continued clipping each value: the same value, another clipping
    clipped = {**hparams, "gradient_clip_val": 0.5, "gradient_clip_algorithm": "norm"}
    (run / "hparams.yaml").write_text(yaml.safe_dump(clipped))
    by_value = {**now, "devices": 1, "gradient_clip_val": 0.5, "gradient_clip_algorithm": "value"}
    assert training_conflicts(run, by_value) == ["gradient_clip_algorithm: norm in the run, value here"]
    # a record that does not parse would let the run go on unchecked, and its next save replace it
    (run / "hparams.yaml").write_text("precision: [32-true")
    cut_short = snapshot(run)
    for command, steps in (("fit", 8), ("validate", 6)):  # an evaluation before it runs
        with pytest.raises(SystemExit):
            main([command, *quick_args(tmp_path, steps=steps, every=4), last])
        out, err = capsys.readouterr()
        assert f"error: {run / 'hparams.yaml'} cannot be read (expected ',' or ']'" in err
        assert snapshot(run) == cut_short and "val/loss" not in out + err


def test_a_checkpoint_its_run_went_past_continues_only_as_a_new_run(tmp_path, capsys):
    """Interrupted at step 4, continued to 6: continuing again from interrupted.ckpt would write steps 4-6
    over the run's own; refused, nothing changes, and the same checkpoint starts a new run instead."""
    signal_at = ["--trainer.callbacks+=tests.probes.SignalAt", "--trainer.callbacks.step=4"]
    with pytest.raises(SystemExit):
        fit(tmp_path, *signal_at, steps=6, every=3)
    run = only_run(tmp_path)
    interrupted = run / "checkpoints" / "interrupted.ckpt"
    fit(tmp_path, f"--ckpt_path={interrupted}", steps=6, every=3)
    before = snapshot(run)
    capsys.readouterr()
    err = refused(capsys, "fit", *quick_args(tmp_path, steps=8, every=3), f"--ckpt_path={interrupted}")
    assert (
        f"the checkpoint {interrupted} is at step 4, but its run went on to step 6 (last.ckpt): continuing "
        "from it would write over steps 4-6 of that run. Continue the run with "
        f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}, or start a new run" in err
    )
    assert snapshot(run) == before
    branch = "--trainer.logger.init_args.version=from-step4"
    cli = fit(tmp_path, f"--ckpt_path={interrupted}", branch, steps=8, every=3)
    assert cli.trainer.global_step == 8 and snapshot(run) == before
    assert [s for s, _ in scalars(tmp_path / "quickstart" / "from-step4")["train/loss"]] == [4, 5, 6, 7]


def test_a_run_that_kept_no_checkpoint_of_its_end_is_not_continued_from_an_earlier_one(tmp_path, capsys):
    """A checkpoint callback of the user's that keeps only the highest loss keeps step 2 of a run of 6:
    continuing the run from it (--ckpt_path=last takes it, its furthest) would write over steps 2-6."""
    own = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.monitor=val/loss",
           "--trainer.callbacks.mode=max", "--trainer.callbacks.filename=worst"]  # fmt: skip
    fit(tmp_path, *own, steps=6, every=2)
    run = only_run(tmp_path)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["worst.ckpt"]
    before, worst = snapshot(run), run / "checkpoints" / "worst.ckpt"
    assert torch.load(worst, weights_only=False)["global_step"] == 2
    capsys.readouterr()
    for resume in (f"--ckpt_path={worst}", f"--trainer.logger.init_args.version={run.name}"):
        extra = ["--ckpt_path=last"] if resume.startswith("--trainer") else []
        err = refused(capsys, "fit", *quick_args(tmp_path, steps=8, every=2), *own, resume, *extra)
        assert "is at step 2, but its run trained on to step 6 and kept no checkpoint of that state: " \
            "continuing from it would write over steps 2-6 of that run. Start a new run" in err  # fmt: skip
    assert snapshot(run) == before


def test_best_checkpoints_are_the_runs_own_wherever_it_lies(tmp_path, recwarn):
    """A run started from another run's checkpoint does not take that run's best checkpoint for its own
    (here it validates nothing: it has none); a run continued after its folder moved keeps its best
    checkpoint, named where it lies now."""
    fit(tmp_path, steps=4, every=2)
    run = only_run(tmp_path)
    best = Path(json.loads((run / "results.json").read_text())["best_checkpoint"]).name
    no_validation = "--trainer.limit_val_batches=0"
    branch = [
        "--trainer.logger.init_args.version=branch",
        f"--ckpt_path={run / 'checkpoints' / 'step4.ckpt'}",
    ]
    fit(tmp_path, *branch, no_validation, steps=6, every=2)
    assert (
        json.loads((tmp_path / "quickstart" / "branch" / "results.json").read_text())["best_checkpoint"]
        is None
    )
    moved = tmp_path / "archive" / run.name
    moved.parent.mkdir()
    shutil.move(run, moved)
    fit(tmp_path, f"--ckpt_path={moved / 'checkpoints' / 'last.ckpt'}", no_validation, steps=6, every=2)
    results = json.loads((moved / "results.json").read_text())
    assert (results["step"], results["best_checkpoint"]) == (6, str(moved / "checkpoints" / best))
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)]


def test_a_second_run_into_the_same_folder_is_refused(finished_run, capsys):
    tmp_path, run, before = finished_run
    capsys.readouterr()
    err = refused(
        capsys,
        "fit",
        *quick_args(tmp_path),
        "--model.head=untied",
        f"--trainer.logger.init_args.version={run.name}",
    )
    assert f"run folder {run.resolve()} already holds a run" in err
    assert snapshot(run) == before


def test_without_a_logger_a_run_still_has_a_folder_of_its_own(finished_run, capsys):
    """Without a logger a fit's config, checkpoints and summary go into a run folder named as any other
    (``<default_root_dir>/lmheads/<run>``), held to the same rules: a failed start leaves nothing, its own
    checkpoint continues it, and evaluations are filed inside it, each in a folder of its own."""
    tmp_path, run, run_before = finished_run
    before = snapshot(tmp_path)
    refused(capsys, "fit", *quick_args(tmp_path), "--trainer.logger=false", "--model.backbone.d_model=130")
    assert snapshot(tmp_path) == before
    fit(tmp_path, "--trainer.logger=false", steps=3, every=3)
    (own,) = (tmp_path / "lmheads").iterdir()
    assert own.name.startswith("tied-seed0-") and (own / "checkpoints" / "step3.ckpt").is_file()
    first = snapshot(own)
    ckpt = own / "checkpoints" / "last.ckpt"
    fit(tmp_path, "--trainer.logger=false", f"--ckpt_path={ckpt}", steps=4)
    assert snapshot(own)["config.yaml"] == first["config.yaml"]
    assert len(list(own.glob("config-resumed-step3-*.yaml"))) == 1
    assert torch.load(ckpt, weights_only=False)["global_step"] == 4
    assert json.loads((own / "results.json").read_text())["step"] == 4  # its summary, as for any run
    config = (own / "config.yaml").read_bytes()
    for command in ("validate", "predict", "predict"):
        main([command, *quick_args(tmp_path), "--trainer.logger=false", f"--ckpt_path={ckpt}",
              "--trainer.limit_predict_batches=1", "--sampling.max_new_tokens=2"])  # fmt: skip
    assert (own / "config.yaml").read_bytes() == config  # not the evaluations' configs
    assert (own / "validate" / "last" / "checkpoint.json").is_file()
    samples = [(own / "predict" / name / "samples-rank0.jsonl") for name in ("last", "last-2")]
    assert all(s.is_file() for s in samples)  # the second predict's samples are not appended to the first's
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["lmheads", "quickstart"]
    assert snapshot(run) == run_before


def test_with_several_loggers_the_first_ones_folder_is_the_run(tmp_path, capsys):
    """Lightning writes the config and checkpoints into the first logger's folder: with TensorBoard first,
    a run is named, held and continued as with TensorBoard alone, and the other loggers get its
    hyperparameters too (a CSV logger takes no HParams metrics)."""
    fit(tmp_path, "--config", two_loggers(tmp_path), steps=2, every=2)
    run = only_run(tmp_path)
    assert run.name.startswith("tied-seed0-") and (run / "checkpoints" / "last.ckpt").is_file()
    csv = run / "csv"  # the second logger's files inside the run
    assert "head: tied" in (csv / "hparams.yaml").read_text() and (csv / "metrics.csv").is_file()
    assert comparable.split_reportable([], [tmp_path]) == ([], "")  # its csv/ is not a run of its own
    before = snapshot(run)
    err = refused(capsys, "fit", *quick_args(tmp_path), "--config", two_loggers(tmp_path, run.name))
    assert f"run folder {run.resolve()} already holds a run" in err and snapshot(run) == before
    last = run / "checkpoints" / "last.ckpt"
    first = (csv / "metrics.csv").read_bytes()
    fit(tmp_path, "--config", two_loggers(tmp_path), f"--ckpt_path={last}", steps=4)
    assert only_run(tmp_path) == run and len(list(run.glob("config-resumed-step2-*.yaml"))) == 1
    assert (csv / "metrics-before-step2.csv").read_bytes() == first  # Lightning's CSV logger deletes it
    steps = {int(row.split(",")[header.index("step")]) for header, row in _csv_rows(csv / "metrics.csv")}
    assert min(steps) >= 2 and max(steps) == 3


def test_a_csv_logger_keeps_runs_as_tensorboard_does(tmp_path, capsys, recwarn):
    """Lightning writes the config and checkpoints into the first logger's folder. The CSV logger's is
    ``save_dir/name/version``, as TensorBoard's: a run there is held to the same rules."""
    csv = ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
           "--trainer.logger.name=quickstart"]  # fmt: skip
    fit(tmp_path, *csv, "--trainer.logger.version=x", steps=3, every=3)
    run = tmp_path / "quickstart" / "x"
    assert (run / "metrics.csv").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    shutil.copy(run / "metrics.csv", tmp_path / "first-metrics.csv")
    before = snapshot(run)
    err = refused(
        capsys, "fit", *quick_args(tmp_path), *csv, "--trainer.logger.version=x", "--model.head=untied"
    )
    assert f"run folder {run.resolve()} already holds a run" in err and snapshot(run) == before
    fit(tmp_path, *csv, steps=3, every=3)  # unnamed: a folder of its own
    assert sorted(p.name.split("-")[:2] == ["tied", "seed0"] for p in run.parent.iterdir()) == [False, True]
    for _ in range(2):
        main(["test", *quick_args(tmp_path), *csv, f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])
    assert sorted(p.name for p in (run / "test").iterdir()) == ["last", "last-2"]
    assert (run / "test" / "last" / "metrics.csv").is_file()
    assert json.loads((run / "test" / "last" / "checkpoint.json").read_text())["step"] == 3
    assert {k: v for k, v in snapshot(run).items() if not k.startswith("test/")} == before
    # continued: Lightning's CSV logger would delete the run's metrics.csv; it is kept under another name
    fit(
        tmp_path,
        *csv,
        "--trainer.logger.version=x",
        f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
        steps=5,
    )
    assert (run / "metrics-before-step3.csv").read_bytes() == (tmp_path / "first-metrics.csv").read_bytes()
    steps = {int(row.split(",")[header.index("step")]) for header, row in _csv_rows(run / "metrics.csv")}
    assert min(steps) >= 3 and max(steps) == 4
    # the reports read TensorBoard's files: they name these runs rather than pass over them without a word
    assert tool("compare").main([str(tmp_path / "quickstart")]) == 2
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and "Without TensorBoard files, the only ones the reports read" in said
    assert str(run) in said.rstrip().split(": ")[-1].split(", ")  # the two runs, named
    noise = ("Experiment logs directory", "The dirpath has changed")  # of the run's own folder
    assert not [w for w in recwarn if str(w.message).startswith(noise)]


def _csv_rows(path: Path) -> list[tuple[list[str], str]]:
    header, *rows = path.read_text().splitlines()
    return [(header.split(","), row) for row in rows]


def test_a_file_set_aside_for_a_continued_run_is_put_back_when_its_start_fails(tmp_path):
    (tmp_path / "metrics.csv").write_text("step\n0\n")
    folder = RunFolder(tmp_path, resume=True)
    folder.claim()
    assert folder.set_aside("metrics.csv", "metrics-before-step1.csv")
    (tmp_path / "metrics.csv").write_text("step\n1\n")  # the new start's, before it failed
    folder.release()
    assert (tmp_path / "metrics.csv").read_text() == "step\n0\n"
    assert not (tmp_path / "metrics-before-step1.csv").exists()


def test_a_claim_onto_a_full_disk_is_one_line_and_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    """The claim is the first file a command writes (a run's, an evaluation's, lm-eval's): a full disk
    left it empty, the folder made for it, and a traceback (a continued run's claim, cut short)."""
    import lmheads.run.claim as claim
    from lmheads import files

    def full(self, *args, **kwargs):
        self.open("w").close()  # created, then nothing fits
        raise OSError(errno.ENOSPC, "No space left on device")

    class Full:  # a claim created, into which nothing fits
        def __init__(self, path, mode):
            self.file = open(path, mode)  # noqa: SIM115 (closed by __exit__)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    monkeypatch.setattr(claim, "open", Full, raising=False)
    message = f"{tmp_path / 'a' / 'run'} cannot be written (No space left on device); free space there"
    with pytest.raises(ConfigError, match=re.escape(message)):
        RunFolder(tmp_path / "a" / "run").claim()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / claim.CLAIM_FILE).write_bytes(b'{"pid": 1}')
    with pytest.raises(ConfigError, match="cannot be written"):
        RunFolder(tmp_path, resume=True).claim()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([claim.CLAIM_FILE, claim.LOCK_FILE])
    assert (tmp_path / claim.CLAIM_FILE).read_bytes() == b'{"pid": 1}' and not RunFolder(tmp_path).holder()
    with pytest.raises(OSError) as written:
        files.write_json(tmp_path / "results.json", {})
    assert written.value.filename == str(tmp_path / "results.json")  # names the file it was for


def test_a_write_that_failed_for_space_or_on_a_read_only_file_system_says_what_to_do(tmp_path, monkeypatch):
    """Read-only file systems refuse even to remove a file that is not there: the clean-up after a failed
    write raised that error in place of the write's own."""
    from lmheads import errors, files

    for code, mended in ((errno.ENOSPC, "free space there"), (errno.EROFS, "make it writable")):
        try:
            try:
                raise OSError(code, os.strerror(code))
            except OSError as err:
                raise RuntimeError("a library's own error") from err
        except RuntimeError as err:
            assert errors.mend(errors.failed_write(err)) == mended
        rust = errors.failed_write(ValueError(f"I/O error: {os.strerror(code)} (os error {code})"))
        assert (rust.errno, errors.mend(rust)) == (code, mended)
    assert errors.failed_write(OSError(errno.EACCES, "Permission denied")) is None  # a read's, too

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "write_text", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(OSError, match="Read-only file system") as written:
        files.write_json(tmp_path / "results.json", {})
    assert written.value.filename == str(tmp_path / "results.json")


def test_a_csv_run_continued_twice_from_one_step_keeps_both_earlier_metrics(tmp_path):
    """A start that trained past its checkpoint and stopped before the next one is continued from the
    same step again: the metrics of both starts are kept."""
    logger = Namespace(class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir="x"))
    config = Namespace(trainer=Namespace(logger=logger))
    for n in (1, 2):
        (tmp_path / "metrics.csv").write_text(f"start {n}")
        folder = RunFolder(tmp_path, resume=True)
        folder.claim()
        for name, new_name in point_loggers(config, Plan(tmp_path, resume=True), 3):
            folder.set_aside(name, new_name)
    assert (tmp_path / "metrics-before-step3.csv").read_text() == "start 1"
    assert (tmp_path / "metrics-before-step3-2.csv").read_text() == "start 2"
    assert not (tmp_path / "metrics.csv").exists()


def test_evaluations_are_filed_with_their_run_and_compare_reads_the_test_split(finished_run, capsys, caplog):
    tmp_path, run, before = finished_run
    last = f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    for _ in range(2):
        main(["test", *quick_args(tmp_path), last])
    with caplog.at_level("INFO"):
        main(["validate", *quick_args(tmp_path), last])
    assert f"validate: filed in {run.resolve() / 'validate' / 'last'}" in caplog.text  # said where it went
    assert "untrained" not in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        main(["validate", *quick_args(tmp_path / "untrained"), "--trainer.logger=false"])
    assert "validate: no --ckpt_path, so this is the untrained model as initialised" in caplog.text
    assert [p.name for p in (tmp_path / "quickstart").iterdir()] == [run.name]
    assert sorted(p.name for p in (run / "test").iterdir()) == ["last", "last-2"]
    assert "test/loss" in scalars(run / "test" / "last")
    assert "val/loss" in scalars(run / "validate" / "last")
    assert {k: v for k, v in snapshot(run).items() if "/" not in k or k.startswith("checkpoints")} == before
    compare = tool("compare")
    (found,) = runlog.find_runs([tmp_path])
    assert found.path == run and "test/loss" in found.scalars
    compare.main([str(tmp_path)])
    assert "| test ppl |" in capsys.readouterr().out
    assert json.loads((run / "test" / "last" / "checkpoint.json").read_text()) == {
        "checkpoint": str((run / "checkpoints" / "last.ckpt").resolve()),
        "step": 6,
        "other_data": [],
    }
    # The run goes on: its last state is no longer the one tested, so no test column until it is again.
    fit(tmp_path, last, steps=9, every=3)
    (found,) = runlog.find_runs([tmp_path])
    assert "test/loss" not in found.scalars
    main(["test", *quick_args(tmp_path), last])
    (found,) = runlog.find_runs([tmp_path])
    assert "test/loss" in found.scalars
    assert json.loads((run / "test" / "last-3" / "checkpoint.json").read_text())["step"] == 9
    # A test on other data is filed with the run, said and recorded, but not the run's test column.
    with caplog.at_level("INFO"):
        main(["test", *quick_args(tmp_path), last, "--data.init_args.val_tokens=8192"])
    assert (
        f"test: filed in {run.resolve() / 'test' / 'last-4'}, on data or settings other than the run's "
        "(data.val_tokens: 8192 here, 4096 in the checkpoint): compare.py does not take it for the run's own"
    ) in caplog.text
    other = json.loads((run / "test" / "last-4" / "checkpoint.json").read_text())["other_data"]
    assert other == ["data.val_tokens: 8192 here, 4096 in the checkpoint"]
    (found,) = runlog.find_runs([tmp_path])
    assert found.scalars["test/loss"] == runlog.load_run(run / "test" / "last-3").scalars["test/loss"]
    # Nor is a test of part of the split: one batch is given as a number, all of them as 1.0.
    for limit, folder, other in (("1", "last-5", ["trainer.limit_test_batches=1: part of the test split"]),
                                 ("1.0", "last-6", [])):  # fmt: skip
        main(["test", *quick_args(tmp_path), last, f"--trainer.limit_test_batches={limit}"])
        assert json.loads((run / "test" / folder / "checkpoint.json").read_text())["other_data"] == other
    # Nor is a test at another precision than the run trained in (its loss moves).
    main(["test", *quick_args(tmp_path), last, "--trainer.precision=bf16-mixed"])
    other = json.loads((run / "test" / "last-7" / "checkpoint.json").read_text())["other_data"]
    assert other == ["trainer.precision=bf16-mixed: the run trained in 32-true"]
    (found,) = runlog.find_runs([tmp_path])
    assert found.scalars["test/loss"] == runlog.load_run(run / "test" / "last-6").scalars["test/loss"]
    # An evaluation of no batches is refused: it would file an evaluation of nothing in the run.
    filed = snapshot(run)
    for subcommand in ("validate", "test", "predict"):
        limit = f"limit_{'val' if subcommand == 'validate' else subcommand}_batches"
        err = refused(capsys, subcommand, *quick_args(tmp_path), last, f"--trainer.{limit}=0")
        assert f"error: trainer.{limit}=0 evaluates nothing: give a number of batches" in err
    assert snapshot(run) == filed


def test_a_checkpoint_evaluates_with_its_runs_own_config(finished_run, capsys):
    """The run's config.yaml names the run's folder: an evaluation with it is filed in the run, as without
    it, and one without any config is told to give it."""
    _, run, before = finished_run
    last, config = f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}", str(run / "config.yaml")
    main(["test", "--config", config, last, "--trainer.enable_progress_bar=false"])
    assert sorted(p.name for p in (run / "test").iterdir()) == ["last"]
    assert "test/loss" in scalars(run / "test" / "last")
    assert {k: v for k, v in snapshot(run).items() if "/" not in k or k.startswith("checkpoints")} == before
    capsys.readouterr()
    err = refused(capsys, "validate", last)
    assert f"the following arguments are required: validate.data (see --help); for the run's own " \
        f"configuration, put --config {config} before --ckpt_path" in err  # fmt: skip
    replaced = f"error: {last} is replaced by a --config given after it (its ckpt_path: null): give " \
        "--ckpt_path after the last --config"  # fmt: skip
    assert replaced in refused(capsys, "validate", last, "--config", config)  # a saved config's null
    later = run.parent.parent / "later.yaml"  # any config's: the test would be of an untrained model
    later.write_text("ckpt_path: null\n")
    assert replaced in refused(capsys, "test", *quick_args(run.parent.parent), last, "--config", str(later))
    assert not (run / "validate").exists() and [p.name for p in (run / "test").iterdir()] == ["last"]
    assert [p.name for p in run.parent.iterdir()] == [run.name]  # nor as an evaluation of no run's
    # another run's config names that run: the evaluation is neither filed there nor told to continue it
    fit(run.parent.parent, "--trainer.logger.init_args.version=other", steps=2, every=2)
    other = run.parent / "other"
    err = refused(capsys, "test", "--config", str(other / "config.yaml"), last)
    assert f"the checkpoint {run / 'checkpoints' / 'last.ckpt'} is of another run, {run}: to test it, give " \
        f"--config {config} before --ckpt_path" in err  # fmt: skip
    assert not (other / "test").exists() and not (run / "validate").exists()


def test_compare_best_reports_the_lowest_validation_and_tests_that_checkpoint(finished_run, capsys):
    tmp_path, run, _ = finished_run
    compare = tool("compare")
    best = json.loads((run / "results.json").read_text())["best_checkpoint"]
    main(["test", *quick_args(tmp_path), f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])
    (found,) = runlog.find_runs([tmp_path], "best")
    assert "test/loss" not in found.scalars  # the best checkpoint was not tested yet: no test column
    main(["test", *quick_args(tmp_path), f"--ckpt_path={best}"])
    shutil.move(run / "test" / "last", tmp_path / "aside")
    (found,) = runlog.find_runs([tmp_path])
    assert "test/loss" not in found.scalars  # nor a test of the best for the last state's columns
    shutil.move(tmp_path / "aside", run / "test" / "last")
    main(["test", *quick_args(tmp_path), f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])  # newer
    assert runlog.test_evaluation(run, "best") == run / "test" / Path(best).stem
    assert runlog.test_evaluation(run, "last") == run / "test" / "last-2"
    results = (run / "results.json").read_text()
    (run / "results.json").unlink()  # as for a run stopped before the end: the step<N> checkpoint's
    assert runlog.test_evaluation(run, "best") == run / "test" / Path(best).stem
    (run / "results.json").write_text(results)
    (found,) = runlog.find_runs([tmp_path], "best")
    losses = dict((s + 1, v) for s, v in scalars(run)["val/loss"])
    step = min(losses, key=losses.get)
    assert found.best("val/loss") == (losses[step], step) and Path(best).stem == f"step{step}"
    capsys.readouterr()
    compare.main([str(tmp_path), "--best"])
    header, _, row = capsys.readouterr().out.strip().splitlines()[-3:]
    names, values = ([c.strip() for c in line.strip("|").split("|")] for line in (header, row))
    cells = dict(zip(names, values, strict=True))
    assert cells["best val loss"] == f"{losses[step]:.4f}" and cells["at step"] == str(step)
    assert cells["test ppl (best ckpt)"] == f"{math.exp(found.final('test/loss')):.2f}"
    assert float(cells["minutes"]) >= 0


def test_a_run_killed_before_its_first_checkpoint_is_named_when_its_folder_is_refused(tmp_path, capsys):
    """SIGKILL (nothing can catch it) after the first step: the folder stays claimed. A second fit into
    it is refused with what happened, and a claim by a live process says it is in use."""
    version = "--trainer.logger.init_args.version=v0"
    killed = run_lmheads(
        "fit", *quick_args(tmp_path), version, "--trainer.callbacks+=tests.probes.SignalAt",
        "--trainer.callbacks.step=1", "--trainer.callbacks.signum=9", cwd=ROOT,
    )  # fmt: skip
    assert killed.returncode == -9
    run = tmp_path / "quickstart" / "v0"
    pid = json.loads((run / ".lmheads-run").read_text())["pid"]
    before = snapshot(run)
    err = refused(capsys, "fit", *quick_args(tmp_path), version)
    assert f"run folder {run.resolve()} was claimed by process {pid} on {socket.gethostname()} at " in err
    assert "which stopped before its first checkpoint: give this one another " in err
    assert snapshot(run) == before
    # a live holder's claim, also one written on another host of a shared file system, holds the folder
    with held_elsewhere(run, host="node-7", started="2026-01-01 00:00:00") as live:
        err = refused(capsys, "fit", *quick_args(tmp_path), version)
    assert (
        f"run folder {run.resolve()} is in use by process {live.pid} on node-7 (started 2026-01-01 00:00:00)"
        in err
    )


def test_a_run_is_continued_by_one_process_at_a_time(finished_run, capsys):
    """A run's lock is held by the process training it until its command ends: a second process
    continuing the run meanwhile is refused; once the holder has gone (ended, or killed without a word,
    its claim still saying it trains), the run continues with no clean-up."""
    tmp_path, run, before = finished_run
    claim_file = run / ".lmheads-run"
    assert "ended" in json.loads(claim_file.read_text())  # the fit that trained it is over
    last = f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    with held_elsewhere(run, host=socket.gethostname(), started="now") as live:
        before = snapshot(run)
        capsys.readouterr()
        err = refused(capsys, "fit", *quick_args(tmp_path, steps=8), last)
        assert (
            f"run folder {run} is in use by process {live.pid} on {socket.gethostname()} (started now), "
            in err
        )
        assert "which trains that run" in err and snapshot(run) == before
    assert "ended" not in json.loads(claim_file.read_text())  # its holder was killed: the claim says nothing
    fit(tmp_path, last, steps=8)
    fit(tmp_path, f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}", steps=10)
    assert json.loads(claim_file.read_text())["pid"] == os.getpid()


def _claim_slowly(run: Path, answers, start, done) -> None:
    """Continue the run's claim as a resume does, then stay alive as a trainer does until both have
    answered."""
    start.wait()
    try:
        RunFolder(run, resume=True).claim()
        answers.put("claimed")
    except ConfigError as error:
        answers.put(str(error))
    done.wait(60)


def test_two_resumes_of_one_run_at_the_same_moment_one_is_refused(tmp_path):
    """Two processes continuing one run at once (two sweeps of one root): one claims the run, the other
    is refused as the run is in use, however their checks and claims interleave."""
    run = tmp_path / "run"
    run.mkdir()
    ended = {"pid": 1, "host": socket.gethostname(), "started": "then", "at": 0.0, "ended": 1.0}
    (run / ".lmheads-run").write_text(json.dumps(ended))
    context = multiprocessing.get_context("fork")
    answers, start, done = context.Queue(), context.Event(), context.Event()
    resumes = [context.Process(target=_claim_slowly, args=(run, answers, start, done)) for _ in range(2)]
    for resume in resumes:
        resume.start()
    start.set()
    got = sorted(answers.get(timeout=30) for _ in resumes)
    done.set()
    for resume in resumes:
        resume.join()
    assert got[0] == "claimed"
    assert got[1].startswith(f"run folder {run} is in use by process ")
    assert json.loads((run / ".lmheads-run").read_text())["pid"] in {r.pid for r in resumes}


def test_a_failed_start_leaves_no_folder(tmp_path, capsys):
    fit(tmp_path, steps=2, every=2)
    run = only_run(tmp_path)
    refused(capsys, "fit", *quick_args(tmp_path), "--model.backbone.d_model=130")  # fails building the model
    refused(capsys, "test", *quick_args(tmp_path), "--model.backbone.d_model=130")
    assert [p.name for p in (tmp_path / "quickstart").iterdir()] == [run.name]


def test_logs_follow_default_root_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "scratch"
    args = [a for a in quick_args(tmp_path) if "save_dir" not in a and "default_root_dir" not in a]
    main(["fit", *args, f"--trainer.default_root_dir={root}"])
    assert not (tmp_path / "runs").exists()
    (run,) = (root / "quickstart").iterdir()
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_fit_ends_with_a_summary_and_results_json(tmp_path, capsys):
    fit(tmp_path, steps=4, every=2)
    out = capsys.readouterr().out
    run = only_run(tmp_path)
    results = json.loads((run / "results.json").read_text())
    assert results["step"] == 4 and results["head"] == "tied"
    assert results["tokens_seen"] == 4 * 32 * 64
    assert Path(results["last_checkpoint"]).name == "last.ckpt"
    assert results["metrics"]["val/loss"] == pytest.approx(scalars(run)["val/loss"][-1][1], rel=1e-6)
    assert f"run: {run.resolve()}" in out and f"val/loss {results['metrics']['val/loss']:.4f}" in out


def test_the_last_step_is_validated_whatever_the_validation_interval(tmp_path):
    """5 steps validated every 3: the run's metrics and its best checkpoint are of step 5, where it ends,
    not of step 3 under the step count of step 5."""
    fit(tmp_path, steps=5, every=3)
    run = only_run(tmp_path)
    validated = scalars(run)["val/loss"]
    assert [step for step, _ in validated] == [2, 4]  # TensorBoard's steps count from 0
    results = json.loads((run / "results.json").read_text())
    assert results["step"] == results["validated_at"] == 5
    assert results["metrics"]["val/loss"] == pytest.approx(validated[-1][1], rel=1e-6)
    assert Path(results["best_checkpoint"]).name == "step5.ckpt"


def test_the_best_checkpoint_is_the_lowest_validation_loss_whatever_callbacks_keep_checkpoints(
    tmp_path, capsys
):
    """With checkpoint callbacks of one's own, the run's best checkpoint (results.json, compare.py --best,
    ``--ckpt_path=best``) is the one of its lowest validation loss, not whatever the first callback calls
    its best: the newest of a callback that keeps one every few steps, or the highest loss of one with
    ``mode=max``."""

    def callback(filename: str, **options) -> list[str]:
        given = [f"--trainer.callbacks.{k}={v}" for k, v in options.items()]
        return ["--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.filename={filename}", *given]

    every = callback("every{step}", every_n_train_steps=2, save_top_k=-1, auto_insert_metric_name="false")
    highest = callback("high{step}", monitor="val/loss", mode="max", auto_insert_metric_name="false")
    lowest = callback("low{step}", monitor="val/loss", save_top_k=2, auto_insert_metric_name="false")
    version = "--trainer.logger.init_args.version="
    fit(tmp_path, *every, *highest, f"{version}none", steps=6, every=2)
    run = tmp_path / "quickstart" / "none"
    assert json.loads((run / "results.json").read_text())["best_checkpoint"] is None
    err = refused(capsys, "test", *quick_args(tmp_path), f"{version}none", "--ckpt_path=best")
    assert f"--ckpt_path=best: the run {run} has no checkpoint kept for its lowest validation loss" in err
    fit(tmp_path, *every, *highest, *lowest, f"{version}lowest", steps=6, every=2)
    run = tmp_path / "quickstart" / "lowest"
    validated = scalars(run)["val/loss"]
    low = min(validated, key=lambda point: point[1])[0] + 1  # logged at step s after s + 1 steps
    assert max(validated, key=lambda point: point[1])[0] + 1 != low
    best = run / "checkpoints" / f"low{low}.ckpt"
    assert json.loads((run / "results.json").read_text())["best_checkpoint"] == str(best)
    main(["test", *quick_args(tmp_path), *every, *highest, *lowest, f"{version}lowest", "--ckpt_path=best"])
    assert json.loads((run / "test" / f"low{low}" / "checkpoint.json").read_text())["checkpoint"] == str(best)


def test_metrics_of_an_earlier_step_say_which(tmp_path, capsys):
    """Validated every second epoch of three, a run's metrics are of the end of the second: the summary
    and results.json say so."""
    epochs = ["--trainer.max_steps=-1", "--trainer.max_epochs=3", "--trainer.check_val_every_n_epoch=2"]
    fit(tmp_path, *epochs, "--trainer.val_check_interval=1.0", "--data.init_args.train_tokens=8192")
    results = json.loads((only_run(tmp_path) / "results.json").read_text())
    assert (results["step"], results["validated_at"]) == (12, 8)
    assert "  (of step 8, the last validation)\n" in capsys.readouterr().out


def test_a_subclass_without_a_name_is_used_by_class_path():
    assert external_heads.SmallInitUntied not in registered_heads().values()
    assert registered_heads()["untied"].__name__ == "UntiedHead"
    assert head_name(external_heads.SmallInitUntied) == "SmallInitUntied"


def test_a_run_is_named_after_the_heads_own_name(tmp_path):
    fit(tmp_path, "--model.head=tests.external_heads.NamedUntied", steps=1, every=1)
    assert only_run(tmp_path).name.startswith("test_named_untied-seed0-")
    fit(tmp_path, "--model.head=tests.external_heads.SmallInitUntied", steps=1, every=1)
    names = sorted(p.name.split("-")[0] for p in (tmp_path / "quickstart").iterdir())
    assert names == ["SmallInitUntied", "test_named_untied"]


def test_quickstart_config_names_no_folder():
    """The logger's folder is left to the CLI (default_root_dir, else runs)."""
    assert "save_dir" not in Path(QUICKSTART).read_text()


@pytest.mark.slow
def test_a_run_prints_nothing_a_user_cannot_act_on(tmp_path):
    """No tips, no notices about Lightning's internals or deprecations inside it, no zero FLOPs column, no
    v_num, also when a run is interrupted; a resumed run's bar counts steps towards max_steps from where it
    stands (the bar a terminal gets, given here as a callback: this output is a file's, which gets plain
    lines, from where it stands too)."""
    base = [*quick_args(tmp_path, steps=4, every=2), "--trainer.enable_progress_bar=true"]
    first = run_lmheads("fit", *base, cwd=tmp_path, new_python=True)
    assert first.returncode == 0, first.stderr[-2000:]
    last = only_run(tmp_path) / "checkpoints" / "last.ckpt"
    base = [*quick_args(tmp_path, steps=8, every=2), "--trainer.enable_progress_bar=true"]
    bar = "--trainer.callbacks+=lmheads.console.ProgressBar"
    resumed = run_lmheads("fit", *base, bar, f"--ckpt_path={last}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    signal_at = ["--trainer.callbacks+=tests.probes.SignalAt", "--trainer.callbacks.step=9"]
    base = [*quick_args(tmp_path, steps=12, every=2), "--trainer.enable_progress_bar=true", *signal_at]
    interrupted = run_lmheads(
        "fit", *base, "--trainer.callbacks.signum=15", f"--ckpt_path={last}", cwd=tmp_path
    )
    assert interrupted.returncode == 143, interrupted.stderr[-2000:]
    for result in (first, resumed, interrupted):
        out = result.stdout + result.stderr
        for noise in ("Tip:", "LeafSpec", "configure_callbacks", "weights_only", "v_num", "Total Flops"):
            assert noise not in out, noise
    bar = resumed.stdout.replace("\r", "\n") + resumed.stderr.replace("\r", "\n")
    assert "8/8 [" in bar and "4/8 [" in bar  # from where it stood to max_steps
    assert "step 9/12 " in interrupted.stdout and "step 8/12 " not in interrupted.stdout


def test_the_time_limit_is_said_once():
    """max_time's timer says its time is up after every batch until the step ends; once is enough."""
    drop = console._DropMessages()

    def said(message: str) -> bool:
        return drop.filter(logging.LogRecord("lightning", logging.INFO, "", 0, message, None, None))

    notices = [f"Time limit reached. Elapsed time is 0:00:0{s}. Signaling Trainer to stop." for s in (8, 9)]
    assert [said(notice) for notice in notices] == [True, False]
    assert said("`Trainer.fit` stopped: `max_steps=6` reached.") and not said("💡 Tip: ...")


def test_a_run_stopped_early_says_why(tmp_path, capsys):
    """Early stopping ends a run at fewer steps (or epochs) than it asked for: its summary and results.json
    say why (Lightning's early stopping says nothing unless verbose); a run that trained them says nothing."""
    stop = ["--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor=val/loss"]
    stop += ["--trainer.callbacks.patience=1", "--trainer.callbacks.min_delta=10"]
    fit(tmp_path / "a", *stop, steps=8, every=2)
    results = json.loads((only_run(tmp_path / "a") / "results.json").read_text())
    assert results["step"] == 4 and results["stopped_early"].startswith("Monitored metric val/loss did not")
    assert f"  stopped early: {results['stopped_early']}\n" in capsys.readouterr().out
    epochs = ["--trainer.max_steps=-1", "--trainer.max_epochs=3", "--data.init_args.train_tokens=16384"]
    fit(tmp_path / "b", *stop, *epochs, every=8)  # 8 batches an epoch, validated at its end
    results = json.loads((only_run(tmp_path / "b") / "results.json").read_text())
    assert results["step"] == 16 and results["stopped_early"].startswith("Monitored metric val/loss did not")
    capsys.readouterr()
    fit(tmp_path / "c", steps=2, every=2)
    assert json.loads((only_run(tmp_path / "c") / "results.json").read_text())["stopped_early"] is None
    assert "stopped early" not in capsys.readouterr().out


def test_a_users_own_checkpoint_callback_is_honoured(tmp_path, capsys):
    """A checkpoint callback of the user's replaces lmheads' one: a second fit into its run names the
    checkpoint it wrote, not a ``last.ckpt`` it never wrote. A filename that would file checkpoints in
    subfolders (a metric's name holds a ``/``), where no lookup of the run's checkpoints looks, is refused."""
    own = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_last=false"]
    cli = fit(tmp_path, *own, "--trainer.callbacks.filename=mine-{step}", steps=2, every=2)
    checkpoints = [c for c in cli.trainer.callbacks if type(c).__name__ == "ModelCheckpoint"]
    assert len(checkpoints) == 1 and checkpoints[0].filename == "mine-{step}"
    run = only_run(tmp_path)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["mine-step=2.ckpt"]
    before = snapshot(tmp_path)
    err = refused(capsys, "fit", *quick_args(tmp_path), f"--trainer.logger.init_args.version={run.name}")
    assert err.endswith(
        f"or continue that run with --ckpt_path={run.resolve() / 'checkpoints' / 'mine-step=2.ckpt'}\n"
    )
    for name, example in [
        ("{step}-{val/loss:.3f}", "step=0-val/loss=0.000.ckpt"),
        ("s/{step}", "s/step=0.ckpt"),
    ]:
        err = refused(capsys, "fit", *quick_args(tmp_path), *own, f"--trainer.callbacks.filename={name}")
        assert f"error: the ModelCheckpoint filename '{name}' would write checkpoints into subfolders" in err
        assert f"of the run's checkpoints/ ({example})" in err
    assert snapshot(tmp_path) == before


def test_lmheads_checkpoint_callback_given_to_keep_more_keeps_the_runs_checkpoints(tmp_path):
    """The one to give for more best checkpoints: it has the run's defaults, ``last.ckpt`` among them."""
    own = ["--trainer.callbacks+=lmheads.checkpointing.RunCheckpoint", "--trainer.callbacks.save_top_k=2"]
    fit(tmp_path, *own, steps=6, every=2)
    names = sorted(p.name for p in (only_run(tmp_path) / "checkpoints").iterdir())
    assert names[0] == "last.ckpt" and len(names) == 3
    assert all(re.fullmatch(r"step[246]\.ckpt", name) for name in names[1:])


def test_a_run_without_checkpoints_is_not_offered_one_to_continue_from(tmp_path, capsys, caplog):
    fit(tmp_path, "--trainer.enable_checkpointing=false", steps=2, every=2)
    run, before = only_run(tmp_path), snapshot(tmp_path)
    version = f"--trainer.logger.init_args.version={run.name}"
    for resume in ([], ["--ckpt_path=last"]):
        with caplog.at_level("INFO"):
            err = refused(capsys, "fit", *quick_args(tmp_path), version, *resume)
        assert err.endswith(
            f"error: run folder {run.resolve()} already holds a run; give this one another "
            "--trainer.logger.init_args.version (that run has no checkpoint to continue from)\n"
        )
    assert "this fit starts that run" not in caplog.text  # it does not: the run is there
    assert snapshot(tmp_path) == before


def test_compare_refuses_to_average_runs_of_other_configurations_as_seeds(tmp_path, capsys):
    fit(tmp_path, steps=2, every=2)
    fit(tmp_path, "--model.lr=0.01", "--trainer.logger.init_args.version=tied-lr", steps=2, every=2)
    compare = tool("compare")
    report = tmp_path / "report"
    assert compare.main([str(tmp_path), "--out", str(report)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the runs of tied are not seeds of one configuration: lr (0.003, 0.01); ")
    assert "seed 0 twice. To compare them, give --by lr to tell them apart" in err
    assert not report.exists()
    assert compare.main([str(tmp_path), "--by", "lr"]) == 0
    out = capsys.readouterr().out
    assert "| tied, lr=0.003 | 0 |" in out and "| tied, lr=0.01 | 0 |" in out


def test_compare_refuses_runs_that_differ_in_an_option_only_their_config_holds(tmp_path, capsys):
    """Options that are not hyperparameters (another validation set) make other runs too, and are named
    beside hyperparameters that differ (the schedule's floor); where a run trained or how it reported
    does not, nor does a copy of its data elsewhere."""
    fit(tmp_path, steps=2, every=2)
    fit(tmp_path, "--seed_everything=1", "--data.init_args.val_tokens=8192", "--model.min_lr_ratio=0.5",
        "--trainer.log_every_n_steps=2", "--sampling.validation_samples=0", steps=2, every=2)  # fmt: skip
    compare = tool("compare")
    assert compare.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert (
        "the runs of tied are not seeds of one configuration: data.init_args.val_tokens (4096, 8192); "
        "min_lr_ratio (0.1, 0.5). To compare them, give --by data.init_args.val_tokens" in err
    )
    assert compare.main([str(tmp_path), "--by", "data.init_args.val_tokens"]) == 0  # a config option too
    assert "| tied, data.init_args.val_tokens=8192 | 1 |" in capsys.readouterr().out
    # a data file by its name: the same text at another path is the same data
    a, b = (runlog.RunLog(Path(n), {"head": "tied", "seed": i}, {}) for i, n in enumerate("ab"))
    a.config, b.config = (
        {"data.init_args.train_file": "/x/train.txt"},
        {"data.init_args.train_file": "train.txt"},
    )
    assert comparable.mixed({"tied": [a, b]}) is None
    # text from a file against text that is not (a hash against none), the hash in a length one can read
    digest = "0123456789abcdef" * 4
    a.hparams["data/train_sha256"], b.hparams["data/train_sha256"] = digest, ""
    reason, _ = comparable.mixed({"tied": [a, b]})
    assert reason.endswith("configuration: data/train_sha256 (none, 0123456789ab...)")
    b.config["data.init_args.train_file"] = "/x/other.txt"
    assert comparable.mixed({"tied": [a, b]})[1] == "data.init_args.train_file"


def test_compare_takes_a_setting_older_runs_did_not_record_for_unknown_not_different():
    compare = tool("compare")
    old = runlog.RunLog(Path("old"), {"head": "tied", "seed": 0, "lr": 0.01}, {})
    new = runlog.RunLog(Path("new"), {"head": "tied", "seed": 1, "lr": 0.01, "gradient_clip_val": 1.0}, {})
    assert comparable.mixed({"tied": [old, new]}) is None
    other = runlog.RunLog(Path("other"), {**new.hparams, "seed": 2, "gradient_clip_val": 0.0}, {})
    assert comparable.mixed({"tied": [old, new, other]})[1] == "gradient_clip_val"
    unseeded = [runlog.RunLog(Path(n), {**old.hparams, "seed": -1}, {}) for n in ("a", "b")]
    reason, _ = comparable.mixed({"tied": unseeded})
    assert reason.endswith("configuration: runs without a seed (seed_everything=false), which no seed pairs")
    # ...and a schedule length that older runs did not record does not split the budget
    logged = {"val/loss": {199: (5.0, 1.0)}}
    old = runlog.RunLog(Path("old"), {"seed": 0, "tokens_per_step": 64, "devices": 1}, logged)
    new = runlog.RunLog(Path("new"), {**old.hparams, "seed": 1, "lr_decay_steps": 200}, logged)
    one = "Budget: 200 steps x 64 tokens/step = 12,800 training tokens on 1 device(s)"
    assert compare.budget({"tied": [old, new]}) == one


def test_compare_says_which_runs_differ_in_budget_and_plots_training_loss(tmp_path, capsys):
    fit(tmp_path, steps=2, every=2)
    fit(tmp_path, "--model.head=untied", steps=4, every=2)
    compare = tool("compare")
    report = tmp_path / "report"
    plot = ["--plot", "diag/grad_share_output", "val/loss", "diag/grad_share_output"]  # val/loss: standard
    assert compare.main([str(tmp_path), "--out", str(report), *plot]) == 0
    out = capsys.readouterr().out
    wrote = next(line for line in out.splitlines() if line.startswith("wrote "))
    assert wrote.count("val_loss_vs_step.png") == 1 and wrote.count("diag_grad_share_output_vs_step") == 1
    assert "WARNING: runs differ in budget" in out
    assert (report / "diag_grad_share_output_vs_step.png").is_file()
    assert "2 steps x 2,048 tokens/step = 4,096 training tokens on 1 device(s): tied seed 0" in out
    assert (tmp_path / "report" / "train_loss_vs_step.png").is_file()
    # a plot that would not be drawn: a tag no run logged (a typo), or no --out to draw it into
    other = tmp_path / "other"
    for args, said in (
        (["--out", str(other), "--plot", "diag/grad_share"], "--plot diag/grad_share: no run logged that "
         "scalar; did you mean diag/grad_share_output"),
        (["--plot", "diag/grad_share_output"], "plots are written into --out; give --out"),
    ):  # fmt: skip
        assert compare.main([str(tmp_path), *args]) == 2
        assert said in capsys.readouterr().err and not other.exists()
    tied, untied = sorted(runlog.find_runs([tmp_path]), key=lambda r: r.hparams["head"])
    plots = tool("plots")
    one = plots.colours({"tied": [tied], "untied": [untied]})
    assert one == plots.colours({"untied": [untied], "tied": [tied]})  # by head, whatever the order
    assert len(set(one.values())) == 2
    split = plots.colours({"tied, a=1": [tied], "tied, a=2": [tied]})  # --by splits a head: one each
    assert len(set(split.values())) == 2


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    """This process as one task of a SLURM job, with an ``scontrol`` that records what it is asked."""
    for key, value in SLURM.items():
        monkeypatch.setenv(key, value)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path / "scontrol.log"


def test_a_fit_leaves_the_signal_handlers_as_it_found_them(tmp_path, slurm):
    """Lightning puts back the handlers it found before lmheads' interruption callback ends; that one
    must not then reinstate those of the finished trainer (a later fit's requeue checkpoint would go to
    the earlier run's folder)."""
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    before = [signal.getsignal(s) for s in signals]
    fit(tmp_path, steps=2, every=2)
    assert [signal.getsignal(s) for s in signals] == before


def test_on_slurm_no_command_starts_from_a_requeue_checkpoint_it_was_not_given(tmp_path, slurm, capsys):
    """Lightning starts a command without a checkpoint from the newest ``hpc_ckpt_N.ckpt`` in
    ``default_root_dir`` when on SLURM, whichever run left it there: lmheads makes that the new run's own
    folder, with a logger or without, so a new run starts from scratch."""
    fit(tmp_path / "first", steps=3)
    shared = tmp_path / "second"
    shared.mkdir()
    shutil.copy(only_run(tmp_path / "first") / "checkpoints" / "last.ckpt", shared / "hpc_ckpt_1.ckpt")
    for no_logger in ((), ("--trainer.logger=false",)):  # default_root_dir is `shared`; each run's own folder
        cli = fit(shared, "--seed_everything=1", *no_logger, steps=6)
        assert cli.trainer.ckpt_path is None and cli.trainer.global_step == 6  # not step 3 of the other run
    assert min(s for s, _ in scalars(only_run(shared))["train/loss"]) == 0


def test_a_requeued_command_continues_its_run(tmp_path, slurm, capsys):
    """The same command, run again by a requeued job, continues its named run from the run's furthest
    state (here the interruption after Lightning's requeue checkpoint), exactly as if never stopped."""
    dropout = "--model.backbone.dropout=0.1"
    straight = fit(tmp_path / "straight", dropout, steps=6).model
    command = [dropout, "--trainer.logger.init_args.version=r", "--ckpt_path=last"]
    signals = [
        "--trainer.callbacks+=tests.probes.SignalAt", "--trainer.callbacks.step=2",
        "--trainer.callbacks.signum=10",  # SIGUSR1: Lightning saves hpc_ckpt_1.ckpt and requeues
        "--trainer.callbacks+=tests.probes.SignalAt", "--trainer.callbacks.step=4",
        "--trainer.callbacks.signum=15",  # SIGTERM: SLURM stops the job it requeued
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        fit(tmp_path / "b", *command, *signals, steps=6)
    assert exc.value.code == 143
    run = tmp_path / "b" / "quickstart" / "r"
    assert slurm.read_text().split() == ["requeue", "4242"]
    requeued = run / "hpc_ckpt_1.ckpt"  # in the run's folder, not in the shared default_root_dir
    assert torch.load(requeued, map_location="cpu", weights_only=False)["global_step"] == 2
    assert not list((tmp_path / "b").glob("hpc_ckpt_*"))
    resumed = fit(tmp_path / "b", *command, steps=6).model  # the job again, the same command
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    straight_losses = scalars(only_run(tmp_path / "straight"))["train/loss"]
    assert dict(scalars(run)["train/loss"]) == dict(straight_losses)
    assert "nothing to train" in refused(capsys, "fit", *quick_args(tmp_path / "b"), *command)


def test_checkpoint_keywords_name_a_file_of_a_named_run(tmp_path, capsys):
    """``last`` and ``best`` resolve in the run the logger's version names; Lightning would look in the
    folder this command starts and find nothing. Without a name, and its other keywords, are refused."""
    version = "--trainer.logger.init_args.version=r"
    fit(tmp_path, version, steps=6)
    run = tmp_path / "quickstart" / "r"
    best = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    best = next(s for s in best["callbacks"].values() if "best_model_path" in s)["best_model_path"]
    before = snapshot(tmp_path)
    for args, message in [
        (["test", "--ckpt_path=best"], "--ckpt_path=best needs the run it refers to"),
        (["fit", "--ckpt_path=hpc"], "--ckpt_path=hpc is not supported"),
        (["fit", "--ckpt_path=best", version], "--ckpt_path=best does not continue a run"),
        (["validate", "--ckpt_path=last", "--trainer.logger.init_args.version=none"], "has no checkpoint"),
    ]:
        assert message in refused(capsys, args[0], *quick_args(tmp_path), *args[1:])
    assert snapshot(tmp_path) == before
    main(["test", *quick_args(tmp_path), "--ckpt_path=best", version])
    main(["validate", *quick_args(tmp_path), "--ckpt_path=last", version])
    tested = json.loads((run / "test" / Path(best).stem / "checkpoint.json").read_text())
    assert Path(tested["checkpoint"]).name == Path(best).name
    validated = json.loads((run / "validate" / "last" / "checkpoint.json").read_text())
    assert validated["step"] == 6
    (run / "checkpoints" / Path(best).name).unlink()  # removed by hand: named, not "no checkpoint yet"
    said = refused(capsys, "test", *quick_args(tmp_path), "--ckpt_path=best", version)
    assert f"validation loss, {run / 'checkpoints' / Path(best).name}, is no longer there" in said


def test_a_fast_dev_run_leaves_no_trace(finished_run):
    """Lightning's dry run logs and saves nothing; its folder goes, and a run it resumed stays as it was
    (Lightning's own checkpoint callback would write last.ckpt of the dry run's state)."""
    tmp_path, run, before = finished_run
    main(
        [
            "fit",
            *quick_args(tmp_path),
            "--trainer.fast_dev_run=true",
            "--trainer.logger.init_args.version=dry",
        ]
    )
    assert not (run.parent / "dry").exists()
    last = run / "checkpoints" / "last.ckpt"
    main(["fit", *quick_args(tmp_path, steps=12), "--trainer.fast_dev_run=true", f"--ckpt_path={last}"])
    assert snapshot(run) == before
    assert [p.name for p in run.parent.iterdir()] == [run.name]
