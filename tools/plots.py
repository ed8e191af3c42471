"""The report tools' plots: one colour per head in every figure, curves of logged scalars against
optimizer steps, training tokens or wall-clock time, and the legend outside the axes.

Used by compare.py, buckets.py and data_regime.py, which put tools/ on the import path.
"""

from __future__ import annotations

import difflib
import statistics
from pathlib import Path

from report import pyplot, save_figure

from lmheads.runlog import RunLog, natural


def colours(groups: dict[str, list[RunLog]]) -> dict[str, str]:
    """One colour per head, the same in every plot; one per group where groups split a head further
    (``--by``)."""
    import matplotlib

    palette = matplotlib.colormaps["tab10"].colors
    heads = [str(runs[0].hparams.get("head")) for runs in groups.values()]
    keys = heads if len(set(heads)) == len(heads) else list(groups)
    index = {key: i for i, key in enumerate(sorted(set(keys), key=natural))}
    return {
        label: matplotlib.colors.to_hex(palette[index[key] % len(palette)])
        for label, key in zip(groups, keys, strict=True)
    }


#: Each plot: file name, the series, its y label and the x axes it is drawn against.
PLOTS = (
    ("val_loss", "val/loss", "validation loss (nats/token)", ("step", "tokens", "minutes")),
    ("train_loss", "train/loss", "training loss (nats/token)", ("step",)),
)
AXES = {"step": "optimizer step", "tokens": "training tokens", "minutes": "wall-clock minutes"}


def plot(groups: dict[str, list[RunLog]], out: Path, extra: tuple[str, ...] = ()) -> list[Path]:
    """The standard plots, and each tag in ``extra`` against optimizer steps (once, and not again where a
    standard plot shows it)."""
    plt = pyplot()

    colour = colours(groups)
    written = []
    extra = tuple(tag for tag in dict.fromkeys(extra) if tag not in {standard[1] for standard in PLOTS})
    plots = [*PLOTS, *((tag.replace("/", "_"), tag, tag, ("step",)) for tag in extra)]
    for name, tag, ylabel, axes in plots:
        if not any(tag in r.scalars for runs in groups.values() for r in runs):
            continue
        for axis in axes:
            fig, ax = plt.subplots(figsize=(8.5, 4.5), dpi=120)
            for label, runs in groups.items():
                curves = [curve(r, tag, axis) for r in runs if tag in r.scalars]
                if not curves:
                    continue
                n = min(len(c[1]) for c in curves)
                xs = [statistics.fmean(c[0][i] for c in curves) for i in range(n)]
                ys = [[c[1][i] for c in curves] for i in range(n)]
                means = [statistics.fmean(y) for y in ys]
                ax.plot(xs, means, color=colour[label], label=f"{label} (n={len(curves)})")
                if len(curves) > 1:
                    lows, highs = [min(y) for y in ys], [max(y) for y in ys]
                    ax.fill_between(xs, lows, highs, color=colour[label], alpha=0.2)
            optimum = optimum_loss(groups)
            if optimum is not None and tag == "val/loss":
                ax.axhline(optimum, color="black", linestyle="--", linewidth=1, label="exact optimum")
            ax.set_xlabel(AXES[axis])
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            written.append(save_plot(fig, ax, out / f"{name}_vs_{axis}.png"))
    return written


def save_plot(fig, ax, path: Path) -> Path:
    """The legend outside the axes (it never hides a curve), the figure written and closed."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)
    return save_figure(fig, path, bbox_inches="tight")


def curve(r: RunLog, tag: str, axis: str) -> tuple[list[float], list[float]]:
    """A run's series against an axis; Lightning logs at its step counter before it advances, so a value
    logged at step s comes after s + 1 optimizer steps (validation) or from the (s + 1)-th (training)."""
    points = r.series(tag)
    steps = [s + 1 for s, _, _ in points]
    tokens_per_step = r.hparams.get("tokens_per_step") or 0
    x = {
        "step": steps,
        "tokens": [s * tokens_per_step for s in steps],
        "minutes": [t / 60 for _, _, t in points],
    }[axis]
    return x, [v for _, v, _ in points]


def optimum_loss(groups: dict[str, list[RunLog]]) -> float | None:
    """The exact optimal validation loss, where the data has one (the synthetic language) and all runs
    share it."""
    values = {r.final("val/optimal_loss") for runs in groups.values() for r in runs}
    return values.pop() if len(values) == 1 and None not in values else None


def unplotted(runs: list[RunLog], tags: list[str], out: Path | None) -> str:
    """Why ``--plot`` would draw nothing ("" if it draws every tag): plots go into ``--out``, and a tag
    no run logged (a typo) would give no plot."""
    if tags and out is None:
        return f"--plot {' '.join(tags)}: plots are written into --out; give --out"
    logged = {tag for r in runs for tag in r.scalars}
    for tag in tags:
        if tag not in logged:
            close = difflib.get_close_matches(tag, sorted(logged), n=3)
            hint = (
                f"; did you mean {', '.join(close)}?" if close else "; TensorBoard's Scalars tab lists those"
            )
            return f"--plot {tag}: no run logged that scalar{hint}"
    return ""
