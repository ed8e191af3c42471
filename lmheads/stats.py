"""The statistics lmheads' reports print, by one policy: an effect over seeds is its mean with a 95%
confidence interval and the number of seeds agreeing with its sign; a p-value (scipy's two-sided paired
t-test) only from :data:`MIN_SEEDS` seeds, always beside its Holm adjustment within the family of
comparisons the table declares (Holm 1979: every comparison of one table is one family)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

#: The fewest seeds a p-value is printed for; with fewer, a table shows the per-seed values alone.
MIN_SEEDS = 3


def mean_std(values: list[float | None], digits: int) -> str:
    """Mean ± standard deviation of the runs that have a value; where some have none (a run not tested,
    a metric it did not log), how many of them the figure is of: ``113.45 (1 of 2)``."""
    present = [v for v in values if v is not None and math.isfinite(v)]
    if not present:
        return "–"
    mean = statistics.fmean(present)
    text = f"{mean:.{digits}f}"
    if len(present) > 1:
        text += f" ± {statistics.stdev(present):.{digits}f}"
    return text if len(present) == len(values) else f"{text} ({len(present)} of {len(values)})"


@dataclass(frozen=True)
class Effect:
    """A difference measured once per seed (paired runs): mean, 95% t-interval of the mean, how many
    seeds have the mean's sign, and the paired t-test's two-sided p (``None`` below :data:`MIN_SEEDS`)."""

    n: int
    mean: float
    low: float | None
    high: float | None
    agree: int
    p: float | None


def effect(differences: list[float]) -> Effect:
    from scipy import stats

    n = len(differences)
    mean = statistics.fmean(differences)
    agree = sum(1 for d in differences if (d > 0) == (mean > 0) and d != 0)
    low = high = p = None
    sd = statistics.stdev(differences) if n >= 2 else 0.0
    if n >= 2:
        half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
        low, high = mean - half, mean + half
    if n >= MIN_SEEDS:  # no spread: the mean is certain (scipy's t is undefined there)
        p = float(stats.ttest_1samp(differences, 0.0).pvalue) if sd > 0 else float(mean == 0)
    return Effect(n, mean, low, high, agree, p)


def holm(ps: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of the p-values of one family (``None``: no test, not counted)."""
    tested = sorted((p, i) for i, p in enumerate(ps) if p is not None)
    m, running, out = len(tested), 0.0, list(ps)
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def effect_text(e: Effect, adjusted: float | None, digits: int = 3) -> str:
    """``+0.072 [+0.026, +0.118], 5/5, p 0.012 (Holm 0.036)``; below :data:`MIN_SEEDS` seeds no p."""
    text = f"{e.mean:+.{digits}f}"
    if e.low is not None:
        text += f" [{e.low:+.{digits}f}, {e.high:+.{digits}f}]"
    text += f", {e.agree}/{e.n}"
    if e.p is not None:
        text += f", p {_p(e.p)} (Holm {_p(adjusted)})"
    return text


def family(differences: list[list[float]], digits: int = 3) -> list[str]:
    """:func:`effect_text` for each comparison of one family, Holm-adjusted together."""
    effects = [effect(d) for d in differences]
    adjusted = holm([e.p for e in effects])
    return [effect_text(e, a, digits) for e, a in zip(effects, adjusted, strict=True)]


def policy_note(comparisons: int) -> str:
    """How a table's effects read, for its caption."""
    return (
        f"mean [95% CI], seeds with its sign; p (with {MIN_SEEDS} seeds or more): scipy's two-sided paired "
        f"t-test, and Holm's adjustment within this table's {comparisons} comparisons"
    )
