"""The statistics lmheads' reports print: a mean over seeds with its spread, and a two-sided paired t-test
over seeds (Student's t in closed form, so that the reports need no scientific library)."""

from __future__ import annotations

import math
import statistics


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


def paired_p(differences: list[float]) -> float | None:
    """Two-sided p-value of a paired t-test that the mean of ``differences`` (one per seed) is zero, with
    n - 1 degrees of freedom; ``None`` for fewer than two."""
    n = len(differences)
    if n < 2:
        return None
    mean, sd = statistics.fmean(differences), statistics.stdev(differences)
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    return 1.0 - t_within(abs(mean) / (sd / math.sqrt(n)), n - 1)


def t_within(t: float, dof: int) -> float:
    """P(|T| <= t) for Student's t with a whole number of degrees of freedom, in closed form (Abramowitz &
    Stegun 26.7.3 for odd, 26.7.4 for even degrees)."""
    theta = math.atan(t / math.sqrt(dof))
    cos2 = math.cos(theta) ** 2
    if dof % 2:  # (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)), dof - 2 powers at most
        term = total = math.cos(theta) if dof > 1 else 0.0
        for k in range(1, (dof - 1) // 2):
            term *= 2 * k / (2 * k + 1) * cos2
            total += term
        return 2 / math.pi * (theta + math.sin(theta) * total)
    term = total = 1.0  # sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
    for k in range(1, dof // 2):
        term *= (2 * k - 1) / (2 * k) * cos2
        total += term
    return math.sin(theta) * total


def p_text(differences: list[float]) -> str:
    """The paired p-value as a table shows it."""
    p = paired_p(differences)
    return "–" if p is None else "<0.001" if p < 0.001 else f"{p:.3f}"


P_NOTE = "p: two-sided paired t-test over the seeds that the mean difference is zero"
