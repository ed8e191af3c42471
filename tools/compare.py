"""Tabulate and plot lmheads runs from their TensorBoard logs, grouped by head.

    python tools/compare.py runs/wikitext2_tying                       # markdown table on stdout
    python tools/compare.py runs/wikitext2_tying --out docs/results/wikitext2_tying \\
        --update docs/studies/wikitext2_short.md                       # + PNG plots, and the doc

A run is a folder with TensorBoard event files and the ``hparams.yaml`` lmheads writes (read by
``lmheads.runlog``). Runs are grouped by head and head options; each metric is the *final* value of
every run, shown as mean +- std over the runs (seeds) of a group, with the validation loss split by
the training frequency of the target token where it was logged. The plots show validation loss against
optimizer step, training tokens and wall-clock time, one line per head (the mean over seeds) with a
band from the lowest to the highest seed.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import pandas as pd
from plots import plot, unplotted
from report import BEGIN, END, check_outputs, command, markdown, publish

from lmheads.comparable import (
    at_step,
    missing_roots,
    mixed,
    no_runs_message,
    order,
    other_data,
    split_reportable,
    unrecorded,
)
from lmheads.metrics import FREQUENCY_BUCKET_LABELS, FREQUENCY_BUCKETS, bucket_loss_metric
from lmheads.runlog import RunLog, find_runs, natural
from lmheads.stats import mean_std

#: Validation loss by how frequent the target token is in training (lmheads' diagnostics).
BUCKETS = {bucket_loss_metric("val", b): f"loss, {FREQUENCY_BUCKET_LABELS[b]}" for b in FREQUENCY_BUCKETS}


def _count(value) -> str:
    return f"{int(value):,}" if value is not None else "–"


def table(groups: dict[str, list[RunLog]], best: bool = False) -> str:
    """One row per group. With ``best``, also each run's lowest validation loss and the step it came at,
    and the test column is that checkpoint's (early stopping on validation, as the literature reports)."""
    any_run = [r for runs in groups.values() for r in runs]
    tags = ("val/bpb", "val/excess_loss", "test/loss", *BUCKETS)
    has = {tag: any(tag in r.scalars for r in any_run) for tag in tags}
    header = ["head", "seeds", "params (unique)", "token emb.", "head own", "val loss", "val ppl"]
    header += ["best val loss", "best val ppl", "at step"] * best
    header += ["val bpb"] * has["val/bpb"] + ["excess loss"] * has["val/excess_loss"]
    header += [label for tag, label in BUCKETS.items() if has[tag]]
    header += [f"test ppl{' (best ckpt)' if best else ''}"] * has["test/loss"]
    harness = sorted({key for r in any_run for key in r.harness})  # lm-eval's results of last.ckpt
    header += harness
    header += ["tokens/s", "peak MiB", "minutes"]
    rows = []
    for label, runs in groups.items():
        hp = runs[0].hparams
        losses = [r.final("val/loss") for r in runs]
        row = [
            label,
            ",".join(str(r.hparams.get("seed")) for r in runs),
            _count(hp.get("params/total")),
            _count(hp.get("params/token_embedding")),
            _count(hp.get("params/head_own")),
            mean_std(losses, 4),
            mean_std([math.exp(v) if v is not None else None for v in losses], 2),
        ]
        if best:
            lowest = [r.best("val/loss") for r in runs]
            row += [
                mean_std([v for v, _ in lowest], 4),
                mean_std([math.exp(v) if v is not None else None for v, _ in lowest], 2),
                ",".join(f"{s:,}" if s is not None else "–" for _, s in lowest),
            ]
        if has["val/bpb"]:
            row.append(mean_std([r.final("val/bpb") for r in runs], 4))
        if has["val/excess_loss"]:
            row.append(mean_std([r.final("val/excess_loss") for r in runs], 4))
        row += [mean_std([r.final(tag) for r in runs], 3) for tag in BUCKETS if has[tag]]
        if has["test/loss"]:
            tests = [r.final("test/loss") for r in runs]
            row.append(mean_std([math.exp(v) if v is not None else None for v in tests], 2))
        row += [mean_std([r.harness.get(key) for r in runs], 4) for key in harness]
        speeds = [
            statistics.fmean(
                v for _, v, _ in r.series("perf/tokens_per_sec")[1:] or r.series("perf/tokens_per_sec")
            )
            if "perf/tokens_per_sec" in r.scalars
            else None
            for r in runs
        ]
        memory = [
            max(v for _, v, _ in r.series("perf/peak_mem_mib")) if "perf/peak_mem_mib" in r.scalars else None
            for r in runs
        ]
        row += [mean_std(speeds, 0), mean_std(memory, 0), mean_std([r.minutes() for r in runs], 1)]
        rows.append(row)
    return markdown(pd.DataFrame(rows, columns=header))


def budget(groups: dict[str, list[RunLog]]) -> str:
    """One line stating the training budget; when runs differ in it, which runs have which."""
    budgets: dict[tuple, list[str]] = defaultdict(list)
    for label, runs in groups.items():
        for r in runs:
            steps = r.steps()
            key = (steps, r.hparams.get("tokens_per_step"), r.hparams.get("devices"), _schedule(r, steps))
            budgets[key].append(f"{label} seed {r.hparams.get('seed')}")

    def describe(steps, tokens, devices, schedule) -> str:
        text = f"{steps:,} steps"
        if tokens:
            text += f" x {tokens:,} tokens/step = {steps * tokens:,} training tokens on {devices} device(s)"
        return text + schedule

    if len(budgets) == 1:
        return "Budget: " + describe(*next(iter(budgets)))
    parts = [f"{describe(*key)}: {', '.join(names)}" for key, names in sorted(budgets.items(), key=str)]
    return "Budget: WARNING: runs differ in budget; " + "; ".join(parts)


def _schedule(run: RunLog, steps: int) -> str:
    """What the budget line says of a run's learning-rate schedule: nothing where it spans the run (or the
    run did not record its length: older runs, training of no set length)."""
    decay = run.hparams.get("lr_decay_steps")
    if not isinstance(decay, int) or decay <= 0 or decay == steps:
        return ""
    if decay < steps:  # a run continued past the schedule it started with
        return f"; the learning rate decayed over the first {decay:,} steps, then held at its minimum"
    return f"; stopped at step {steps:,} of its {decay:,}-step learning-rate schedule"


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("roots", nargs="+", type=Path, help="folders holding runs (searched recursively)")
    parser.add_argument("--out", type=Path, help="folder for the table (table.md) and PNG plots")
    parser.add_argument("--update", type=Path, help=f"markdown file whose {BEGIN}...{END} section to replace")
    parser.add_argument(
        "--section", help="replace <!-- compare:SECTION:begin/end --> instead (several tables in one file)"
    )
    parser.add_argument(
        "--by", nargs="+", default=[], metavar="KEY", help="also group by these hparams (e.g. tokenizer)"
    )
    parser.add_argument(
        "--plot", nargs="+", default=[], metavar="TAG", help="also plot these scalars against steps"
    )
    parser.add_argument(
        "--best",
        action="store_true",
        help="also the lowest validation loss of each run and its step; the test column from the test of "
        "that (best) checkpoint instead of the last",
    )
    parser.add_argument(
        "--step",
        type=int,
        metavar="N",
        help="every run as it stood after N steps, at the validation each logged then (runs a time limit "
        "stopped at different points); a test column only of checkpoints of step N or before",
    )
    args = parser.parse_args(argv)
    if problem := missing_roots(args.roots) or check_outputs(args.out, args.update, args.section):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    runs, left_out = split_reportable(find_runs(args.roots, "best" if args.best else "last"), args.roots)
    if not runs:
        print(no_runs_message(args.roots, left_out), file=sys.stderr)
        return 2
    if problem := unrecorded(runs, args.by) or unplotted(runs, args.plot, args.out):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    stood = ""
    if args.step is not None:
        trained = sorted({r.steps() for r in runs})
        runs, missing = at_step(runs, args.step)
        if missing:
            print(f"error: {missing}", file=sys.stderr)
            return 2
        lengths = f"{trained[0]:,}" + (f" to {trained[-1]:,}" if len(trained) > 1 else "")
        stood = f"As the runs stood after {args.step:,} steps (they trained {lengths} steps):"
    groups: dict[str, list[RunLog]] = defaultdict(list)

    def label(r: RunLog) -> str:
        return ", ".join([r.label, *(f"{key}={r.setting(key)}" for key in args.by)])

    def place(r: RunLog) -> tuple:  # by head, then by each --by value as a number where it is one
        return (
            natural(r.label),
            *(order(r.setting(key)) for key in args.by),
            order(r.hparams.get("seed", 0)),
        )

    for r in sorted(runs, key=place):
        groups[label(r)].append(r)
    problem = mixed(groups)
    if problem:
        reason, key = problem
        advice = f"give --by {key} to tell them apart, or" if key else "give"
        print(f"error: {reason}. To compare them, {advice} their folders in separate calls", file=sys.stderr)
        return 2
    text = "\n\n".join(
        filter(None, [stood, budget(groups), other_data(groups, args.by), left_out, table(groups, args.best)])
    )
    publish(text, args.out, lambda out: plot(groups, out, tuple(args.plot)), args.update, args.section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
