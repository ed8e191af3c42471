"""Excess loss against training-set size, per head: when does tying help?

    python tools/data_regime.py runs/synthetic_data_regime --out docs/results/synthetic_data_regime \\
        --update docs/studies/synthetic.md --section data_regime

Reads the runs under the given folders (``lmheads.runlog`` finds them), groups them by head and by
the number of tokens in their training split (``train_set_tokens``), and reports, as mean ± std over
seeds: the excess loss at the end of training and at its best validation (the best checkpoint's), the
epochs trained, and the gap between validation and training loss at the end. Plots excess loss against
training tokens, one colour per head, final (solid) and best (dashed). Needs data with a known optimum
(the synthetic language logs ``val/excess_loss``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import pandas as pd
from plots import colours, save_plot
from report import check_outputs, command, markdown, publish, pyplot

from lmheads import comparable
from lmheads.comparable import missing_roots, split_reportable
from lmheads.runlog import RunLog, find_runs
from lmheads.stats import mean_std


def final_train_loss(run: RunLog, last: int = 3) -> float | None:
    """Mean of the last few logged training losses (one batch each)."""
    values = [v for _, v, _ in run.series("train/loss")][-last:]
    return statistics.fmean(values) if values else None


def grouped(runs: list[RunLog]) -> dict[tuple[str, int], list[RunLog]]:
    """The runs with an excess loss by head and training-set size: the seeds of one point."""
    groups: dict[tuple[str, int], list[RunLog]] = defaultdict(list)
    for r in runs:
        if "val/excess_loss" in r.scalars:
            groups[(r.label, int(r.hparams.get("train_set_tokens", -1)))].append(r)
    return groups


def summarise(groups: dict[tuple[str, int], list[RunLog]]) -> dict[tuple[str, int], dict]:
    out = {}
    for key, members in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1])):
        finals = [r.final("val/excess_loss") for r in members]
        bests = [min(v for _, v, _ in r.series("val/excess_loss")) for r in members]
        trains = [(r.final("val/loss"), final_train_loss(r)) for r in members]
        gaps = [val - train for val, train in trains if train is not None]
        tokens_seen = [r.steps() * (r.hparams.get("tokens_per_step") or 0) for r in members]
        out[key] = {
            "seeds": [r.hparams.get("seed") for r in members],
            "final": finals,
            "best": bests,
            "gap": gaps,
            "epochs": statistics.fmean(tokens_seen) / key[1] if key[1] > 0 else float("nan"),
        }
    return out


def table(summary: dict[tuple[str, int], dict]) -> str:
    header = [
        "head",
        "training tokens",
        "epochs",
        "excess loss, final",
        "excess loss, best",
        "val - train loss",
    ]
    rows = []
    for (label, tokens), s in summary.items():
        cells = [
            label,
            f"{tokens:,}",
            f"{s['epochs']:.1f}",
            mean_std(s["final"], 3),
            mean_std(s["best"], 3),
            mean_std(s["gap"], 3),
        ]
        rows.append(cells)
    return markdown(pd.DataFrame(rows, columns=header))


def plot(summary: dict[tuple[str, int], dict], runs: list[RunLog], out: Path) -> Path:
    plt = pyplot()

    groups: dict[str, list[RunLog]] = defaultdict(list)
    for r in runs:
        groups[r.label].append(r)
    colour = colours(dict(groups))
    fig, ax = plt.subplots(figsize=(8.5, 4.8), dpi=120)
    for label in sorted({key[0] for key in summary}):
        keys = sorted(k for k in summary if k[0] == label)
        xs = [k[1] for k in keys]
        for field, style, name in (("final", "-", "final"), ("best", "--", "best checkpoint")):
            means = [statistics.fmean(summary[k][field]) for k in keys]
            errs = [statistics.stdev(summary[k][field]) if len(summary[k][field]) > 1 else 0 for k in keys]
            ax.errorbar(xs, means, yerr=errs, color=colour[label], linestyle=style, marker="o", markersize=3,
                        capsize=2, label=f"{label}, {name}")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")  # from overfitting (several nats) to near the optimum (a tenth of one)
    ax.set_xlabel("tokens in the training set")
    ax.set_ylabel("excess validation loss (nats/token)")
    ax.grid(alpha=0.3)
    return save_plot(fig, ax, out / "excess_loss_vs_training_tokens.png")


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("roots", nargs="+", type=Path, help="folders holding runs")
    parser.add_argument("--out", type=Path, help="folder for table.md and the plot")
    parser.add_argument("--update", type=Path, help="markdown file with a generated section to replace")
    parser.add_argument("--section", help="the section's name (<!-- compare:SECTION:begin -->)")
    args = parser.parse_args(argv)
    if problem := missing_roots(args.roots) or check_outputs(args.out, args.update, args.section):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    runs, left_out = split_reportable(find_runs(args.roots), args.roots)
    runs = [r for r in runs if "val/excess_loss" in r.scalars]
    if not runs:
        roots = ", ".join(map(str, args.roots))
        known = "only data with a known optimum, the synthetic language, logs val/excess_loss"
        print(f"error: no runs with an excess loss under {roots} ({known})", file=sys.stderr)
        return 2
    groups = grouped(runs)
    problem = comparable.mixed(
        {f"{head} with {tokens:,} training tokens": g for (head, tokens), g in groups.items()}
    )
    if problem:
        print(f"error: {problem[0]}; give their folders in separate calls", file=sys.stderr)
        return 2
    summary = summarise(groups)
    text = "\n\n".join(filter(None, [left_out, table(summary)]))
    draw = lambda out: [plot(summary, runs, out)]  # noqa: E731
    publish(text, args.out, draw, args.update, args.section, alt="excess loss against training tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
