"""Where is a parameter best saved? Validation loss against unique parameters, and against training
FLOPs, one curve per way of saving parameters from one reference model.

    python tools/frontier.py runs/sharing_synthetic --reference untied --out docs/results/sharing_synthetic

The reference is the largest run of the ``--reference`` head without layer sharing. Every other run is
placed by the one way it differs from the reference: ``tie`` (the tied head), ``share layers``
(``layer_sharing``, k blocks), ``fewer layers`` (``n_layer``), ``narrower`` (``d_model``) or ``factorised
embedding`` (``d_embed`` < ``d_model``); a run that differs in two ways, or in another way, is refused.
Each point is the mean over seeds of the final validation loss (``--at best``: each run's lowest, the
loss of its best checkpoint, as early stopping would keep); its difference from the reference is paired
by seed (a run whose seed the reference lacks is named above the table), and the differences of one table
are one family under lmheads' statistics policy (:mod:`lmheads.stats`: 95% interval, seeds agreeing in
sign, p with Holm's adjustment). Divided by the parameters saved, it is the loss each way pays per 100k
parameters.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from report import check_outputs, command, markdown, publish, pyplot, save_figure

from lmheads.comparable import missing_roots, no_runs_message, split_reportable
from lmheads.runlog import RunLog, find_runs
from lmheads.stats import family, mean_std, policy_note

WAYS = ("tie", "share layers", "fewer layers", "narrower", "factorised embedding")
LOSS: dict[str, Callable[[RunLog], float]] = {
    "final": lambda run: run.final("val/loss"),
    "best": lambda run: run.best("val/loss")[0],
}
LABEL = {"final": "final validation loss", "best": "lowest validation loss (best checkpoint)"}
SHAPE = ("head", "backbone/layer_sharing", "backbone/n_layer", "backbone/d_model", "backbone/d_embed")


def place(run: RunLog, reference: dict) -> tuple[str, str]:
    """The way ``run`` saves parameters against the reference's hyperparameters, and its setting
    (``reference`` for the reference itself); raises ``ValueError`` for any other difference."""
    hp = run.hparams
    sharing = hp.get("backbone/layer_sharing", "none")
    found = []
    if hp["head"] != reference["head"]:
        found.append(("tie", "tied") if hp["head"] == "tied" else ("", f"head {hp['head']}"))
    if sharing != "none":
        found.append(("share layers", f"k={hp.get('backbone/unique_layers')} ({sharing})"))
    for key, way, name in (("backbone/n_layer", "fewer layers", "L"), ("backbone/d_model", "narrower", "D")):
        if hp[key] < reference[key]:
            found.append((way, f"{name}={hp[key]}"))
        elif hp[key] > reference[key]:
            found.append(("", f"{name}={hp[key]}, larger than the reference's"))
    if hp["backbone/d_embed"] < hp["backbone/d_model"]:
        found.append(("factorised embedding", f"E={hp['backbone/d_embed']}"))
    if not found:
        return "reference", "reference"
    if len(found) > 1 or not found[0][0]:
        raise ValueError(f"{run.path.name} is not one way of saving from the reference: {found}")
    return found[0]


def points(runs: list[RunLog], reference_head: str) -> tuple[dict, dict[tuple[str, str], list[RunLog]]]:
    """The reference's hyperparameters and the runs of each (way, setting)."""
    candidates = [
        r for r in runs if r.hparams["head"] == reference_head and r.hparams.get("backbone/layer_sharing") in
        (None, "none") and r.hparams["backbone/d_embed"] == r.hparams["backbone/d_model"]
    ]  # fmt: skip
    if not candidates:
        raise ValueError(f"no run of head {reference_head} without layer sharing to be the reference")
    reference = max(candidates, key=lambda r: r.hparams["params/total"]).hparams
    grouped: dict[tuple[str, str], list[RunLog]] = defaultdict(list)
    for run in runs:
        grouped[place(run, reference)].append(run)
    return reference, grouped


def budget_problem(runs: list[RunLog]) -> str:
    """Why the runs' final values are not of one training budget ("" if they are)."""
    budgets = {(r.validated_at(), r.hparams.get("tokens_per_step")) for r in runs}
    if len(budgets) == 1:
        return ""
    seen = ", ".join(f"{s:,} steps x {t:,} tokens" for s, t in sorted(budgets, key=str))
    return f"the runs were last validated after different budgets ({seen}); train them to one length"


def table(
    reference: dict, grouped: dict[tuple[str, str], list[RunLog]], at: str
) -> tuple[str, dict[str, float]]:
    """The markdown table of each run's validation loss (``at``: final or best), one row per point,
    and each way's mean loss per 100k parameters saved. The differences from the reference are paired
    by seed and form one family (:mod:`lmheads.stats`)."""
    loss = LOSS[at]
    ref_loss = {r.hparams["seed"]: loss(r) for r in grouped[("reference", "reference")]}
    ref_params = reference["params/total"]
    order = {way: i for i, way in enumerate(("reference", *WAYS))}
    points = sorted(grouped.items(), key=lambda kv: (order[kv[0][0]], -_params(kv[1])))
    paired = {
        key: [loss(r) - ref_loss[r.hparams["seed"]] for r in runs if r.hparams["seed"] in ref_loss]
        for key, runs in points
        if key[0] != "reference"
    }
    effects = dict(zip(paired, family(list(paired.values()), digits=4), strict=True))
    header = ["way of saving", "setting", "unique params", "saved", "FLOPs/token", "seeds", "val loss"]
    header += ["minus reference", "per 100k saved"]
    rows = []
    costs: dict[str, list[float]] = defaultdict(list)
    for (way, setting), runs in points:
        hp = runs[0].hparams
        saved = ref_params - hp["params/total"]
        row = [way, setting, f"{hp['params/total']:,}", f"{saved:,}", f"{hp.get('flops_per_token', 0):,}"]
        row += [",".join(str(s) for s in sorted(r.hparams["seed"] for r in runs))]
        row += [mean_std([loss(r) for r in runs], 4)]
        differences = paired.get((way, setting))
        if not differences or saved <= 0:
            row += [effects.get((way, setting), ""), ""]
        else:
            per = statistics.fmean(differences) / saved * 1e5
            costs[way].append(per)
            row += [effects[(way, setting)], f"{per:+.4f}"]
        rows.append(row)
    text = f"Minus reference: {policy_note(len(paired))}.\n\n{markdown(pd.DataFrame(rows, columns=header))}"
    alone = [
        f"{way} {setting} seed {r.hparams['seed']}"
        for (way, setting), runs in points
        for r in runs
        if way != "reference" and r.hparams["seed"] not in ref_loss
    ]
    if alone:  # in the row's mean, not in its difference
        text = f"No reference run of their seed (not in 'minus reference'): {', '.join(alone)}\n\n{text}"
    return text, {way: statistics.fmean(v) for way, v in costs.items()}


def _params(runs: list[RunLog]) -> int:
    return runs[0].hparams["params/total"]


def plot(grouped: dict[tuple[str, str], list[RunLog]], out: Path, at: str) -> Path:
    """Validation loss (``at``: final or best) against unique parameters and against training FLOPs,
    one line per way through its points and the reference, with the seeds' standard deviation as error
    bars."""
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    reference = grouped[("reference", "reference")]

    def xy(runs: list[RunLog], flops: bool) -> tuple[float, float, float]:
        hp = runs[0].hparams
        tokens = (runs[0].validated_at() or 0) * hp.get("tokens_per_step", 0)
        x = hp.get("flops_per_token", 0) * tokens if flops else hp["params/total"]
        losses = [LOSS[at](r) for r in runs]
        return x, statistics.fmean(losses), statistics.stdev(losses) if len(losses) > 1 else 0.0

    for ax, flops in zip(axes, (False, True), strict=True):
        for i, way in enumerate(WAYS):
            series = [xy(runs, flops) for (w, _), runs in grouped.items() if w == way]
            if not series:
                continue
            series = sorted([*series, xy(reference, flops)])
            x, y, err = zip(*series, strict=True)
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=way, color=f"C{i}")
        x, y, err = xy(reference, flops)
        ax.errorbar([x], [y], yerr=[err], marker="*", markersize=14, color="black", label="reference")
        ax.set_xlabel("training FLOPs" if flops else "unique parameters")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{LABEL[at]} (nats/token)")
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    fig.legend(unique.values(), unique.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return save_figure(fig, out / "frontier.png", dpi=120, bbox_inches="tight")


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("roots", nargs="+", type=Path, help="folders holding the study's runs")
    parser.add_argument("--reference", default="untied", help="the reference model's head")
    parser.add_argument("--out", type=Path, help="folder for table.md and frontier.png")
    parser.add_argument(
        "--at", choices=sorted(LOSS), default="final", help="each run's final or lowest validation loss"
    )
    args = parser.parse_args(argv)
    if problem := missing_roots(args.roots) or check_outputs(args.out):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    runs, left_out = split_reportable(find_runs(args.roots), args.roots)
    if not runs:
        print(no_runs_message(args.roots, left_out), file=sys.stderr)
        return 2
    try:
        reference, grouped = points(runs, args.reference)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if problem := budget_problem(runs):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    text, costs = table(reference, grouped, args.at)
    ranking = ", ".join(f"{way} {cost:+.4f}" for way, cost in sorted(costs.items(), key=lambda kv: kv[1]))
    hp = runs[0].hparams
    tokens = (runs[0].validated_at() or 0) * hp.get("tokens_per_step", 0)
    lines = [
        f"Budget: {tokens:,} training tokens a run. Reference: head {reference['head']}, "
        f"{reference['backbone/n_layer']} layers of width {reference['backbone/d_model']}, "
        f"{reference['params/total']:,} unique parameters. Each value: the {LABEL[args.at]}.",
        left_out,
        text,
        f"Loss per 100k parameters saved (mean over each way's budgets, lowest first): {ranking}.",
    ]
    publish("\n\n".join(filter(None, lines)), args.out, lambda out: [plot(grouped, out, args.at)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
