"""Runs of two heads paired by seed, and the differences a report takes from them: final values per
frequency bucket, validation loss at each step the pairs share, and every head against one.

Each pair is of one seed within a group of equal ``--by`` settings; each head's runs in a group must be
seeds of one configuration (:func:`lmheads.comparable.mixed`) and, for final values, last validated after
one number of steps. ``tools/buckets.py`` prints and plots them.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from lmheads import comparable
from lmheads.metrics import (
    COUNT_BUCKET_LABELS,
    COUNT_BUCKETS,
    FREQUENCY_BUCKET_LABELS,
    FREQUENCY_BUCKETS,
    bucket_loss_metric,
    count_loss_metric,
)
from lmheads.runlog import RunLog, natural

#: The validation losses a difference is taken of: all tokens, and per frequency bucket (percentiles of
#: the vocabulary) or, with COUNT_TAGS, per how often a type occurs in training.
TAGS = {"val/loss": "all tokens"} | {
    bucket_loss_metric("val", b): FREQUENCY_BUCKET_LABELS[b] for b in FREQUENCY_BUCKETS
}
COUNT_TAGS = {"val/loss": "all tokens"} | {
    count_loss_metric("val", b): COUNT_BUCKET_LABELS[b] for b in COUNT_BUCKETS
}


def group_name(by: list[str], group: tuple) -> str:
    """``train_set_tokens=16,384`` for the values ``group`` of the settings ``by``."""
    name = ", ".join(
        f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in zip(by, group, strict=True)
    )
    return name or "all runs"


def pairs_by_group(
    runs: list[RunLog], first: str, second: str, by: list[str], final: bool = True
) -> dict[str, dict[object, tuple[RunLog, RunLog]]]:
    """``{group: {seed: (first's run, second's run)}}``: the runs of the two heads paired by seed within a
    group of equal ``by`` hyperparameters, groups and seeds in order. For their ``final`` values, the runs
    must have been last validated after one number of steps (over steps, the validations they share
    are compared instead)."""
    pairs: dict[tuple, dict[str, RunLog]] = defaultdict(dict)
    for r in runs:
        if r.hparams.get("head") in (first, second):
            key = (tuple(r.setting(k) for k in by), r.hparams.get("seed"))
            other = pairs[key].get(r.hparams["head"])
            if other is not None:
                raise SystemExit(
                    f"error: two {r.hparams['head']} runs with seed {key[1]} ({other.path} and {r.path}); "
                    "tell them apart with --by, or give the runs to compare as folders"
                )
            pairs[key][r.hparams["head"]] = r
    out: dict[str, dict] = defaultdict(dict)

    def order(item) -> tuple:
        (group, seed), _ = item
        return (*(comparable.order(v) for v in group), str(seed))

    for (group, seed), members in sorted(pairs.items(), key=order):
        if first not in members or second not in members:
            continue
        pair = [members[first], members[second]]
        if final and pair[0].validated_at() != pair[1].validated_at():
            uneven = comparable.uneven(pair)
            raise SystemExit(f"error: the runs of seed {seed} were last validated after {uneven}")
        out[group_name(by, group)][seed] = (members[first], members[second])
    for group, seeds in out.items():  # each head's runs in a group: the seeds of one configuration
        for i, head in enumerate((first, second)):
            problem = comparable.mixed({f"{head} ({group})": [pair[i] for pair in seeds.values()]}, final)
            if problem:
                reason, key = problem
                advice = f"tell them apart with --by {key}, or give" if key else "give"
                raise SystemExit(f"error: {reason}; {advice} their folders in separate calls")
    return out


def differences(paired: dict[str, dict], tags: dict[str, str] = TAGS) -> dict[str, dict]:
    """``{group: {tag: [difference per seed]}}`` of the final values, ``first - second``, for each of
    ``tags`` in order (an empty list where no pair logged it)."""
    out: dict[str, dict] = {}
    for group, seeds in paired.items():
        out[group] = {tag: [] for tag in tags}
        for a_run, b_run in seeds.values():
            for tag in tags:
                a, b = a_run.final(tag), b_run.final(tag)
                if a is not None and b is not None:
                    out[group][tag].append(a - b)
    return out


def over_steps(paired: dict[str, dict]) -> dict[str, dict]:
    """``{group: {"steps": [...], "epochs": [...], "seeds": {seed: [difference at each step]}}}``: the
    validation loss of ``first - second`` at the validations every pair of the group logged, as optimizer
    steps trained (a validation logged at step s follows s + 1 steps)."""
    out = {}
    for group, seeds in paired.items():
        curves = {seed: (val_loss_by_step(a), val_loss_by_step(b)) for seed, (a, b) in seeds.items()}
        common = sorted(set.intersection(*(set(a) & set(b) for a, b in curves.values())))
        if not common:
            continue
        run = next(iter(seeds.values()))[0]
        per_step, train = run.hparams.get("tokens_per_step"), run.hparams.get("train_set_tokens")
        out[group] = {
            "steps": [s + 1 for s in common],
            "epochs": [(s + 1) * per_step / train if per_step and train else None for s in common],
            "seeds": {seed: [a[s] - b[s] for s in common] for seed, (a, b) in curves.items()},
        }
    return out


def against(runs: list[RunLog], reference: str, by: list[str]) -> dict[str, dict[object, float]]:
    """``{row: {seed: difference}}``: the final validation loss of each other head minus ``reference``'s,
    paired by seed (rows ``head`` or, with ``by``, ``head (group)``), group by group and within a group
    in order of the mean difference."""
    groups = sorted(
        {tuple(r.setting(k) for k in by) for r in runs}, key=lambda g: [comparable.order(v) for v in g]
    )
    position = {group_name(by, group): i for i, group in enumerate(groups)}
    rows, order = {}, {}
    for head in sorted({str(r.hparams.get("head")) for r in runs} - {reference}, key=natural):
        for group, seeds in pairs_by_group(runs, head, reference, by).items():
            row = head if group == "all runs" else f"{head} ({group})"
            rows[row] = {seed: a.final("val/loss") - b.final("val/loss") for seed, (a, b) in seeds.items()}
            order[row] = (position[group], statistics.fmean(rows[row].values()))
    return dict(sorted(rows.items(), key=lambda item: order[item[0]]))


def unpaired(runs: list[RunLog], partners: dict[str, set[str]], by: list[str]) -> str:
    """A line naming the runs of the heads compared (``partners``: each head and the heads it is paired
    with) that have no partner of their seed in their ``by`` group ("" if none): the tables leave them
    out, and would otherwise do so without a word."""

    def key(r: RunLog, head) -> tuple:
        return head, tuple(r.setting(k) for k in by), r.hparams.get("seed")

    present = {key(r, r.hparams.get("head")) for r in runs}
    alone = [
        r
        for r in sorted(runs, key=lambda r: natural(r.path.name))
        if r.hparams.get("head") in partners
        and not any(key(r, other) in present for other in partners[r.hparams["head"]])
    ]
    if not alone:
        return ""
    names = ", ".join(f"{r.label} seed {r.hparams.get('seed')} ({r.path.name})" for r in alone)
    return f"Without a run of the other head with the same seed (not in the table): {names}"


def val_loss_by_step(run: RunLog) -> dict[int, float]:
    return {step: value for step, value, _ in run.series("val/loss")}


def absent_heads(runs: list[RunLog], heads: list[str]) -> str:
    """Why the heads asked for cannot be compared ("" if they can): one head twice (a difference of
    zero), or a head of which there are no runs (the heads the runs have are named)."""
    if len(heads) > 1 and heads[0] == heads[1]:
        return f"--heads names {heads[0]} twice; give two different heads"
    present = sorted({str(r.hparams.get("head")) for r in runs}, key=natural)  # as the runs are paired
    missing = [head for head in heads if head not in present]
    if missing:
        return f"no runs of head {missing[0]} among the runs given; their heads: {', '.join(present)}"
    return ""
