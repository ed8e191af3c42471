"""Where does tying help or hurt? The loss difference between two heads per training-frequency bucket.

    python tools/buckets.py runs/wikitext2_tying --heads tied untied --out docs/results/buckets \\
        --update docs/results.md --section rare_tokens

Pairs the runs of the two heads by seed (and by every ``--by`` hyperparameter, e.g. ``train_set_tokens``)
and reports, for all tokens and for each bucket of target tokens (the most frequent 1% of types, the
next 9%, the rarest 90%), the mean over pairs of the final validation-loss difference ``first head -
second head`` with its standard deviation and the number of pairs: negative where the first head is
better. Plots the differences as bars with the seeds' spread. Every mean difference comes with the p-value
of a two-sided paired t-test over the seeds (is it zero?); with two or three seeds that test has one or
two degrees of freedom, assumes normally distributed differences, and is weak.

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
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling tools
import compare

from lmheads import runlog
from lmheads.metrics import FREQUENCY_BUCKET_LABELS, FREQUENCY_BUCKETS, bucket_loss_metric
from lmheads.runlog import RunLog, find_runs, natural, no_runs_message, split_reportable
from lmheads.stats import P_NOTE, mean_std, p_text

TAGS = {"val/loss": "all tokens"} | {
    bucket_loss_metric("val", b): FREQUENCY_BUCKET_LABELS[b] for b in FREQUENCY_BUCKETS
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
        return (*(runlog.order(v) for v in group), str(seed))

    for (group, seed), members in sorted(pairs.items(), key=order):
        if first not in members or second not in members:
            continue
        pair = [members[first], members[second]]
        if final and pair[0].validated_at() != pair[1].validated_at():
            uneven = runlog.uneven(pair)
            raise SystemExit(f"error: the runs of seed {seed} were last validated after {uneven}")
        out[group_name(by, group)][seed] = (members[first], members[second])
    for group, seeds in out.items():  # each head's runs in a group: the seeds of one configuration
        for i, head in enumerate((first, second)):
            problem = runlog.mixed({f"{head} ({group})": [pair[i] for pair in seeds.values()]}, final)
            if problem:
                reason, key = problem
                advice = f"tell them apart with --by {key}, or give" if key else "give"
                raise SystemExit(f"error: {reason}; {advice} their folders in separate calls")
    return out


def differences(paired: dict[str, dict]) -> dict[str, dict]:
    """``{group: {tag: [difference per seed]}}`` of the final values, ``first - second``."""
    out: dict[str, dict] = defaultdict(lambda: defaultdict(list))
    for group, seeds in paired.items():
        for a_run, b_run in seeds.values():
            for tag in TAGS:
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
        curves = {seed: (_val_loss(a), _val_loss(b)) for seed, (a, b) in seeds.items()}
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
        {tuple(r.setting(k) for k in by) for r in runs}, key=lambda g: [runlog.order(v) for v in g]
    )
    position = {group_name(by, group): i for i, group in enumerate(groups)}
    rows, order = {}, {}
    for head in sorted({str(r.hparams.get("head")) for r in runs} - {reference}, key=natural):
        for group, seeds in pairs_by_group(runs, head, reference, by).items():
            row = head if group == "all runs" else f"{head} ({group})"
            rows[row] = {seed: a.final("val/loss") - b.final("val/loss") for seed, (a, b) in seeds.items()}
            order[row] = (position[group], statistics.fmean(rows[row].values()))
    return dict(sorted(rows.items(), key=lambda item: order[item[0]]))


def against_table(rows: dict[str, dict], _: str, reference: str) -> str:
    seeds = sorted({seed for values in rows.values() for seed in values}, key=runlog.order)
    header = ["head", *(f"seed {seed}" for seed in seeds), "mean", "p"]
    lines = [
        f"Final validation loss of each head minus {reference} (nats/token; negative: better than "
        f"{reference}), per seed ({P_NOTE}):",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row, values in rows.items():
        cells = [f"{values[seed]:+.3f}" if seed in values else "–" for seed in seeds]
        mean, p = statistics.fmean(values.values()), p_text(list(values.values()))
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {mean:+.3f} | {p} |")
    return "\n".join(lines)


def against_plot(rows: dict[str, dict], _: str, reference: str, out: Path, name: str) -> Path:
    """A bar per row, the mean over seeds, with a dot per seed; rows of groups (``--by``): the groups
    along the axis, a bar of each head's colour in each, on a scale linear near zero and logarithmic
    beyond (differences of a thousandth and of nats side by side)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.5), dpi=120)
    split = [_head_and_group(row) for row in rows]
    groups = list(dict.fromkeys(group for _, group in split))
    if groups == [""]:
        xs, width, colours, ticks = list(range(len(rows))), 0.6, ["tab:blue"] * len(rows), list(rows)
    else:
        heads = sorted({head for head, _ in split}, key=natural)
        palette = matplotlib.colormaps["tab10"].colors
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
    return compare.save_plot(fig, ax, out / f"{name}.png")


def _head_and_group(row: str) -> tuple[str, str]:
    """The head and the group of a row: ``untied (tokens=16,384)`` -> ``("untied", "tokens=16,384")``,
    ``untied`` -> ``("untied", "")``."""
    head, _, group = row.partition(" (")
    return head, group.removesuffix(")")


def _val_loss(run: RunLog) -> dict[int, float]:
    return {step: value for step, value, _ in run.series("val/loss")}


def steps_table(trajectories: dict[str, dict], first: str, second: str) -> str:
    title = (
        f"Validation loss of {first} minus {second} at each validation (nats/token; negative: {first} is "
        f"better), per seed ({P_NOTE})"
    )
    lines = [f"{title}:"]
    for group, t in trajectories.items():
        seeds = list(t["seeds"])
        header = ["step", "epochs", *(f"seed {seed}" for seed in seeds), "mean", "p"]
        lines += ["", f"{group}:"] if len(trajectories) > 1 else [""]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for i, step in enumerate(t["steps"]):
            values = [t["seeds"][seed][i] for seed in seeds]
            epochs = "–" if t["epochs"][i] is None else f"{t['epochs'][i]:.1f}"
            mean = f"{statistics.fmean(values):+.3f}"
            cells = [f"{step:,}", epochs, *(f"{v:+.3f}" for v in values), mean, p_text(values)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def steps_plot(trajectories: dict[str, dict], first: str, second: str, out: Path, name: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    return compare.save_plot(fig, ax, out / f"{name}.png")


def table(diffs: dict[str, dict], first: str, second: str) -> str:
    header = ["runs", "pairs", *(f"{label}" for label in TAGS.values())]
    title = f"Validation loss of {first} minus {second} (nats/token; negative: {first} is better), mean ± std"
    lines = [f"{title} over seeds, p in brackets ({P_NOTE}):", "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "---|" * len(header))
    for group, per_tag in diffs.items():
        n = len(per_tag["val/loss"])
        cells = [
            group,
            str(n),
            *(
                f"{mean_std(per_tag[tag], 4)} ({p_text(per_tag[tag])})" if per_tag[tag] else "–"
                for tag in TAGS
            ),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(diffs: dict[str, dict], first: str, second: str, out: Path, name: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(diffs)
    width = 0.8 / max(len(groups), 1)
    fig, ax = plt.subplots(figsize=(8.5, 4.5), dpi=120)
    for i, group in enumerate(groups):
        xs = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(TAGS))]
        values = [diffs[group][tag] for tag in TAGS]
        means = [statistics.fmean(v) if v else float("nan") for v in values]
        errs = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        ax.bar(xs, means, width=width, yerr=errs, capsize=3, label=group)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_yscale("symlog", linthresh=0.01)  # linear within +-0.01 nats, logarithmic beyond
    ax.set_xticks(range(len(TAGS)), list(TAGS.values()))
    ax.set_ylabel(f"val loss, {first} - {second} (nats)")
    ax.grid(alpha=0.3, axis="y")
    return compare.save_plot(fig, ax, out / f"{name}.png")


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
    parser.add_argument("--against", metavar="HEAD", help="every other head minus this one, per seed")
    parser.add_argument("--update", type=Path, help="markdown file with a generated section to replace")
    parser.add_argument("--section", help="the section's name (<!-- compare:SECTION:begin -->)")
    parser.add_argument(
        "--step", type=int, metavar="N", help="the runs as they stood after N steps (compare.py --step)"
    )
    args = parser.parse_args(argv)
    if problem := compare.check_outputs(args.out, args.update, args.section):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    first, second = args.heads
    runs, left_out = split_reportable(find_runs(args.roots))
    if not runs:
        print(no_runs_message(args.roots, left_out), file=sys.stderr)
        return 2
    if problem := runlog.unrecorded(runs, args.by):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if problem := absent_heads(runs, [args.against] if args.against else args.heads):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.step is not None:
        runs, missing = runlog.at_step(runs, args.step)
        if missing:
            print(f"error: {missing}", file=sys.stderr)
            return 2
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
        result = differences(paired)
        name, text, draw, what = args.name or "bucket_differences", table, plot, "by frequency bucket"
    return _write(args, result, first, second, name, text, draw, what, note=left_out)


def absent_heads(runs: list[RunLog], heads: list[str]) -> str:
    """Why the heads asked for cannot be compared ("" if they can): one head twice (a difference of
    zero), or a head of which there are no runs (the heads the runs have are named)."""
    if len(heads) > 1 and heads[0] == heads[1]:
        return f"--heads names {heads[0]} twice; give two different heads"
    present = sorted({r.label for r in runs}, key=natural)
    missing = [head for head in heads if head not in present]
    if missing:
        return f"no runs of head {missing[0]} among the runs given; their heads: {', '.join(present)}"
    return ""


def _write(args, result, first: str, second: str, name: str, text, draw, what: str, note: str = "") -> int:
    """Print the table (after the lines naming the runs it leaves out, if any); with ``--out`` write it
    and its plot there, with ``--update`` into the document."""
    text = "\n\n".join(filter(None, [note, text(result, first, second)]))
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{name}.md").write_text(text + "\n")
        image = draw(result, first, second, args.out, name)
        print(f"wrote {args.out / (name + '.md')}, {image}")
        if args.update:
            link = f"![{first} minus {second} {what}]({os.path.relpath(image, args.update.parent)})"
            compare.update_document(args.update, f"{text}\n\n{link}", args.section)
            print(f"updated {args.update}")
    elif args.update:
        compare.update_document(args.update, text, args.section)
        print(f"updated {args.update}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
