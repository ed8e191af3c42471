"""A run's home: :mod:`~lmheads.run.layout` (what a run folder holds), :mod:`~lmheads.run.plan` (which
folder a command writes to, and every logger pointed there), :mod:`~lmheads.run.claim` (one writer at a
time, nothing left by a failed start), :mod:`~lmheads.run.resume` (what a continuation must agree with)
and :mod:`~lmheads.run.records` (what a command leaves at its end)."""
