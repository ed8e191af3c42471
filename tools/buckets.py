"""Where does tying help or hurt? The loss difference between two heads per training-frequency bucket.

    python tools/buckets.py runs/wikitext2_tying --heads tied untied --out docs/results/buckets \\
        --update docs/studies/synthetic.md --section rare_synthetic

Pairs the runs of the two heads by seed (and by every ``--by`` hyperparameter, e.g. ``train_set_tokens``;
a run without a partner of its seed is named above the table) and reports, for all tokens and for each
bucket of target tokens (the most frequent 1% of types, the next 9%, the rarest 90%), the mean over pairs
of the final validation-loss difference ``first head - second head`` with its standard deviation and the
number of pairs: negative where the first head is better. Plots the differences as bars with the seeds'
spread. Every mean difference comes with the p-value of a two-sided paired t-test over the seeds (is it
zero?); with two or three seeds that test has one or two degrees of freedom, assumes normally distributed
differences, and is weak.

    python tools/buckets.py runs/wikitext2_converged --heads untied tied --over-steps

``--over-steps`` tabulates instead how the difference in validation loss (all tokens) developed: at each
validation that every pair logged, the difference for each seed, their mean, and the epochs of the
training set seen by then; the plot shows it against the optimizer step.

    python tools/buckets.py runs/wikitext2_tying --against tied

``--against HEAD`` sets every other head of the runs against one: the final validation-loss difference
(all tokens) of each head minus HEAD, per seed, and their mean, heads in order of the mean.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import pandas as pd
from pairs import (
    COUNT_TAGS,
    TAGS,
    absent_heads,
    against,
    differences,
    over_steps,
    pairs_by_group,
    unpaired,
)
from plots import save_plot
from report import check_outputs, command, markdown, publish, pyplot

from lmheads import comparable
from lmheads.comparable import missing_roots, no_runs_message, other_data, split_reportable
from lmheads.runlog import find_runs, natural
from lmheads.stats import family, policy_note

LABELS = {**TAGS, **COUNT_TAGS}


def against_table(rows: dict[str, dict], _: str, reference: str) -> str:
    seeds = sorted({seed for values in rows.values() for seed in values}, key=comparable.order)
    header = ["head", *(f"seed {seed}" for seed in seeds), "effect"]
    effects = family([list(values.values()) for values in rows.values()])
    cells = [
        [row, *(f"{values[seed]:+.3f}" if seed in values else "–" for seed in seeds), text]
        for (row, values), text in zip(rows.items(), effects, strict=True)
    ]
    title = (
        f"Final validation loss of each head minus {reference} (nats/token; negative: better than "
        f"{reference}), per seed ({policy_note(len(rows))}):"
    )
    return f"{title}\n\n{markdown(pd.DataFrame(cells, columns=header))}"


def against_plot(rows: dict[str, dict], _: str, reference: str, out: Path, name: str) -> Path:
    """A bar per row, the mean over seeds, with a dot per seed; rows of groups (``--by``): the groups
    along the axis, a bar of each head's colour in each, on a scale linear near zero and logarithmic
    beyond (differences of a thousandth and of nats side by side)."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(8.5, 4.5), dpi=120)
    split = [_head_and_group(row) for row in rows]
    groups = list(dict.fromkeys(group for _, group in split))
    if groups == [""]:
        xs, width, colours, ticks = list(range(len(rows))), 0.6, ["tab:blue"] * len(rows), list(rows)
    else:
        heads = sorted({head for head, _ in split}, key=natural)
        palette = plt.colormaps["tab10"].colors
        width = 0.8 / len(heads)
        xs = [groups.index(g) + (heads.index(h) - (len(heads) - 1) / 2) * width for h, g in split]
        colours = [palette[heads.index(h) % len(palette)] for h, _ in split]
        ticks = groups
        ax.set_yscale("symlog", linthresh=0.01)
    labelled = set()
    for x, (head, _), colour, values in zip(xs, split, colours, rows.values(), strict=True):
        label = "mean over seeds" if groups == [""] else head
        ax.bar(x, statistics.fmean(values.values()), width=width * 0.9, color=colour, alpha=0.6,
               label=None if label in labelled else label)  # fmt: skip
        labelled.add(label)
        ax.plot([x] * len(values), list(values.values()), ".", color="black",
                label=None if "a seed" in labelled else "a seed")  # fmt: skip
        labelled.add("a seed")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(ticks)), ticks, rotation=20, ha="right")
    ax.set_ylabel(f"val loss, head - {reference} (nats)")
    ax.grid(alpha=0.3, axis="y")
    return save_plot(fig, ax, out / f"{name}.png")


def _head_and_group(row: str) -> tuple[str, str]:
    """The head and the group of a row: ``untied (tokens=16,384)`` -> ``("untied", "tokens=16,384")``,
    ``untied`` -> ``("untied", "")``."""
    head, _, group = row.partition(" (")
    return head, group.removesuffix(")")


def steps_table(trajectories: dict[str, dict], first: str, second: str) -> str:
    comparisons = sum(len(t["steps"]) for t in trajectories.values())
    title = (
        f"Validation loss of {first} minus {second} at each validation (nats/token; negative: {first} is "
        f"better), per seed ({policy_note(comparisons)})"
    )
    lines = [f"{title}:"]
    every = [
        [t["seeds"][seed][i] for seed in t["seeds"]]
        for t in trajectories.values()
        for i in range(len(t["steps"]))
    ]
    effects = iter(family(every))
    for group, t in trajectories.items():
        seeds = list(t["seeds"])
        header = ["step", "epochs", *(f"seed {seed}" for seed in seeds), "effect"]
        lines += ["", f"{group}:"] if len(trajectories) > 1 else [""]
        rows = []
        for i, step in enumerate(t["steps"]):
            values = [t["seeds"][seed][i] for seed in seeds]
            epochs = "–" if t["epochs"][i] is None else f"{t['epochs'][i]:.1f}"
            rows.append([f"{step:,}", epochs, *(f"{v:+.3f}" for v in values), next(effects)])
        lines.append(markdown(pd.DataFrame(rows, columns=header)))
    return "\n".join(lines)


def steps_plot(trajectories: dict[str, dict], first: str, second: str, out: Path, name: str) -> Path:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(8.5, 4.5), dpi=120)
    for group, t in trajectories.items():
        label = "" if len(trajectories) == 1 else f"{group}, "
        at_step = list(zip(*t["seeds"].values(), strict=True))  # the seeds' differences at each step
        mean = [statistics.fmean(values) for values in at_step]
        line = ax.plot(
            t["steps"], mean, marker="o", label=f"{label}mean of {len(t['seeds'])} seeds (band: their range)"
        )[0]
        low, high = [min(values) for values in at_step], [max(values) for values in at_step]
        ax.fill_between(t["steps"], low, high, color=line.get_color(), alpha=0.2)  # the seeds' range
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"val loss, {first} - {second} (nats)")
    ax.grid(alpha=0.3)
    return save_plot(fig, ax, out / f"{name}.png")


def table(diffs: dict[str, dict], first: str, second: str) -> str:
    tags = list(next(iter(diffs.values())))  # every group has the same tags, in order
    header = ["runs", "pairs", *(LABELS[tag] for tag in tags)]
    cells = [(group, tag) for group, per_tag in diffs.items() for tag in tags if per_tag[tag]]
    effects = dict(zip(cells, family([diffs[g][t] for g, t in cells], digits=4), strict=True))
    title = f"Validation loss of {first} minus {second} (nats/token; negative: {first} is better)"
    rows = [
        [group, str(len(per_tag["val/loss"])), *(effects.get((group, tag), "–") for tag in tags)]
        for group, per_tag in diffs.items()
    ]
    return (
        f"{title}, over seeds ({policy_note(len(cells))}):\n\n{markdown(pd.DataFrame(rows, columns=header))}"
    )


def plot(diffs: dict[str, dict], first: str, second: str, out: Path, name: str) -> Path:
    plt = pyplot()

    groups, tags = list(diffs), list(next(iter(diffs.values())))
    width = 0.8 / max(len(groups), 1)
    fig, ax = plt.subplots(figsize=(8.5, 4.5), dpi=120)
    for i, group in enumerate(groups):
        xs = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(tags))]
        values = [diffs[group][tag] for tag in tags]
        means = [statistics.fmean(v) if v else float("nan") for v in values]
        errs = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        ax.bar(xs, means, width=width, yerr=errs, capsize=3, label=group)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_yscale("symlog", linthresh=0.01)  # linear within +-0.01 nats, logarithmic beyond
    ax.set_xticks(range(len(tags)), [LABELS[tag] for tag in tags], rotation=20 * (len(tags) > 4))
    ax.set_ylabel(f"val loss, {first} - {second} (nats)")
    ax.grid(alpha=0.3, axis="y")
    return save_plot(fig, ax, out / f"{name}.png")


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("roots", nargs="+", type=Path, help="folders holding runs")
    parser.add_argument("--heads", nargs=2, default=["tied", "untied"], metavar=("FIRST", "SECOND"))
    parser.add_argument("--by", nargs="*", default=[], help="hyperparameters that must match within a pair")
    parser.add_argument("--out", type=Path, help="folder for the table and the plot")
    parser.add_argument(
        "--name",
        help="file name of the table and plot (bucket_differences; with --over-steps differences_over_steps, "
        "with --against against_HEAD)",
    )
    parser.add_argument(
        "--over-steps", action="store_true", help="the difference at each validation instead of per bucket"
    )
    parser.add_argument(
        "--counts",
        action="store_true",
        help="buckets by how often a type occurs in training (never, once, 2-4, 5-19, 20-99, 100+ times) "
        "instead of frequency percentiles: the same buckets for runs of one vocabulary",
    )
    parser.add_argument("--against", metavar="HEAD", help="every other head minus this one, per seed")
    parser.add_argument("--update", type=Path, help="markdown file with a generated section to replace")
    parser.add_argument("--section", help="the section's name (<!-- compare:SECTION:begin -->)")
    parser.add_argument(
        "--step", type=int, metavar="N", help="the runs as they stood after N steps (compare.py --step)"
    )
    args = parser.parse_args(argv)
    if problem := missing_roots(args.roots) or check_outputs(args.out, args.update, args.section):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    first, second = args.heads
    runs, left_out = split_reportable(find_runs(args.roots), args.roots)
    if not runs:
        print(no_runs_message(args.roots, left_out), file=sys.stderr)
        return 2
    if problem := comparable.unrecorded(runs, args.by):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.step is not None:
        runs, missing = comparable.at_step(runs, args.step)
        if missing:
            print(f"error: {missing}", file=sys.stderr)
            return 2
    if problem := absent_heads(runs, [args.against] if args.against else args.heads):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.against:
        others = {str(r.hparams.get("head")) for r in runs} - {args.against}
        partners = {args.against: others} | {head: {args.against} for head in others}
    else:
        partners = {first: {second}, second: {first}}
    compared = {head: [r for r in runs if r.hparams.get("head") == head] for head in partners}
    left_out = "\n\n".join(
        filter(None, [other_data(compared, args.by), left_out, unpaired(runs, partners, args.by)])
    )
    if args.against:
        result = against(runs, args.against, args.by)
        if not result:
            print(f"error: no other head's runs pair with {args.against}'s by seed", file=sys.stderr)
            return 2
        name = args.name or f"against_{args.against}"
        parts = (against_table, against_plot, "per seed")
        return _write(args, result, "each head", args.against, name, *parts, note=left_out)
    paired = pairs_by_group(runs, first, second, args.by, final=not args.over_steps)
    if not paired:
        print(f"error: no pairs of {first} and {second} runs with the same seed", file=sys.stderr)
        return 2
    if args.over_steps:
        result = over_steps(paired)
        if not result:
            print(f"error: the pairs of {first} and {second} runs share no validation step", file=sys.stderr)
            return 2
        name, text, draw, what = args.name or "differences_over_steps", steps_table, steps_plot, "over steps"
    else:
        result = differences(paired, COUNT_TAGS if args.counts else TAGS)
        name, text, draw, what = args.name or "bucket_differences", table, plot, "by frequency bucket"
    return _write(args, result, first, second, name, text, draw, what, note=left_out)


def _write(args, result, first: str, second: str, name: str, text, draw, what: str, note: str = "") -> int:
    """Print the table (after the lines naming the runs it leaves out, if any); with ``--out`` write it
    and its plot there, with ``--update`` into the document."""
    text = "\n\n".join(filter(None, [note, text(result, first, second)]))
    draw_into = lambda out: [draw(result, first, second, out, name)]  # noqa: E731
    publish(text, args.out, draw_into, args.update, args.section, name, alt=f"{first} minus {second} {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
