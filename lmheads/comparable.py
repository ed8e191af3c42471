"""Which runs a table may report, and which of them one mean over seeds (or one paired difference) may
take: runs that diverged or were never validated are set apart, and runs that are not seeds of one
configuration, or whose final values are of different budgets, are named with what tells them apart.
``tools/compare.py``, ``tools/buckets.py`` and ``tools/data_regime.py`` refuse such groups through these.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmheads.run.claim import CLAIM_FILE
from lmheads.runlog import EVALUATIONS, RunLog, natural


def missing_roots(roots: list[Path]) -> str:
    """Which of the folders given to a report do not exist ("" if all do): a typo would otherwise read as
    a folder without runs, or leave a row out of the table without a word."""
    missing = [str(root) for root in roots if not Path(root).is_dir()]
    if not missing:
        return ""
    return f"{', '.join(missing)}: no such folder; give folders that hold runs (e.g. runs/quickstart)"


def no_runs_message(roots: list[Path], left_out: str) -> str:
    """What to say when the roots hold no run to report (naming those left out, if any), on one line."""
    where = ", ".join(map(str, roots)) + (f"; {left_out}".replace("\n\n", "; ") if left_out else "")
    return f"error: no lmheads runs with validation loss under {where}"


def split_reportable(runs: list[RunLog], roots: list[Path] = ()) -> tuple[list[RunLog], str]:
    """The runs a table can report, and lines naming the others ("" if none): runs whose loss became NaN
    or infinite (their last values come from before it did, and averaged with the others they would read
    as runs stopped early), runs with no validation yet (stopped, or still training, before their
    first), runs with a damaged TensorBoard file (whose values after the damage are unread, so that
    its last values may not be its last), and runs under ``roots`` recorded without TensorBoard (whose
    files the reports read), which a table would otherwise leave out without a word."""
    by_name = sorted(runs, key=lambda r: natural(r.path.name))
    damaged = [r for r in by_name if r.damaged]
    diverged = [r for r in by_name if r.diverged_at is not None and not r.damaged]
    unvalidated = [
        r for r in by_name if r.diverged_at is None and not r.damaged and "val/loss" not in r.scalars
    ]
    kept = [r for r in runs if r.diverged_at is None and not r.damaged and "val/loss" in r.scalars]
    lines = []
    if damaged:
        names = "; ".join(f"{_named(r)} ({r.path.name}: {', '.join(r.damaged)})" for r in damaged)
        lines.append(
            "Damaged TensorBoard files (a record fails its checksum, and nothing after it can be read; not "
            f"in the tables): {names}"
        )
    if diverged:
        names = ", ".join(f"{_named(r)} at step {r.diverged_at:,}" for r in diverged)
        lines.append(f"Diverged (training loss NaN or infinite; not in the tables): {names}")
    if unvalidated:
        names = ", ".join(f"{_named(r)} ({r.path.name})" for r in unvalidated)
        lines.append(f"Not validated yet (not in the tables): {names}")
    if unread := _without_tensorboard(roots):
        lines.append(
            "Without TensorBoard files, the only ones the reports read (CSV, W&B or MLflow alone; not in "
            f"the tables): {unread}"
        )
    return kept, "\n\n".join(lines)


def _without_tensorboard(roots: list[Path]) -> str:
    """The run folders under ``roots`` (a command's claim file in them, not an evaluation filed in a
    run) with no TensorBoard file anywhere in them."""
    folders = {
        p.parent
        for root in roots
        for p in Path(root).rglob(CLAIM_FILE)
        if not (p.parent.parent.name in EVALUATIONS and (p.parent.parent.parent / CLAIM_FILE).is_file())
        and not any(p.parent.rglob("events.out.tfevents.*"))
    }
    return ", ".join(str(f) for f in sorted(folders, key=lambda f: natural(str(f))))


def _named(run: RunLog) -> str:
    return f"{run.label} seed {run.hparams.get('seed')}"


def _hashable(value):
    return json.dumps(value, sort_keys=True) if isinstance(value, list | dict) else value


def order(value) -> tuple:
    """Numbers by value before anything else by its text."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return (0, value, "") if number else (1, 0, str(value))


def mixed(groups: dict[str, list[RunLog]], final: bool = True) -> tuple[str, str | None] | None:
    """Why a group is not seeds of one configuration, if it is not: its runs differ in a hyperparameter
    other than the seed (the budget aside, which ``compare.py``'s budget line reports), or two of them
    have one seed; and, for their ``final`` values, their last validations came after other numbers of
    steps. Averaged as seeds, such runs would make a row that no configuration trained. Returns the
    reason and the hyperparameter that would tell the runs apart (``None`` when there is none)."""
    for label, runs in groups.items():
        settings = [r.settings() for r in runs]
        keys = sorted(set().union(*settings))
        # a key some runs lack was not recorded by them (older lmheads), not set otherwise
        values = {k: sorted({_hashable(s[k]) for s in settings if k in s}, key=order) for k in keys}
        differ = {k: v for k, v in values.items() if len(v) > 1}
        seeds = [r.hparams.get("seed") for r in runs]
        repeated = sorted({str(seed) for seed in seeds if seeds.count(seed) > 1}, key=natural)
        if not differ and not repeated:
            if final and len({r.validated_at() for r in runs}) > 1:
                return f"the runs of {label} were last validated after {uneven(runs)}", None
            continue
        # name the hyperparameters that differ and the config's options (keys with dots) that differ where
        # no hyperparameter repeats them (lr repeats model.lr, head_options the head's init_args, and
        # backbone/n_layer model.backbone.n_layer); parameter counts follow the options
        hparams = {k for s in settings for k in s if "." not in k}
        recorded = [k for k in differ if "." not in k or not _repeated(k, hparams)] or list(differ)
        chosen = [k for k in recorded if not k.startswith("params/")] or recorded
        reasons = [f"{k} ({', '.join(map(_shown, differ[k]))})" for k in chosen]
        reasons += [
            "runs without a seed (seed_everything=false), which no seed pairs"
            if seed == "-1"  # the seed a run records without one
            else f"seed {seed} twice"
            for seed in repeated
        ]
        hint = next((k for k in chosen if not k.startswith("params/")), None)
        return f"the runs of {label} are not seeds of one configuration: {'; '.join(reasons)}", hint
    return None


#: Hyperparameters that say what a run trained and was validated on (with its config's ``data.`` options
#: and the ``data/`` digests of its text); its batch size is the budget line's, its test file the test
#: column's.
DATA_HPARAMS = frozenset({"data", "tokenizer", "vocab_size", "train_set_tokens"})


def _is_data(key: str) -> bool:
    return key in DATA_HPARAMS or key.startswith(("data/", "data."))


def _data(run: RunLog) -> dict:
    return {
        k: v
        for k, v in run.settings().items()
        if _is_data(k) and not k.endswith((".batch_size", ".test_file"))
    }


def other_data(groups: dict[str, list[RunLog]], by: list[str]) -> str:
    """A line warning that the rows of a table trained or were validated on different data ("" if they
    did not, or if ``by`` groups them by a data setting, as a study of data asks): their losses per
    token then measure different things. Names which runs had which data, as the budget line does."""
    runs = [(label, r) for label, rs in groups.items() for r in rs]
    if any(_is_data(k) for k in by) or not runs:
        return ""
    data = [_data(r) for _, r in runs]
    shared = set.intersection(*(set(d) for d in data))  # a key some runs lack: not recorded by them
    differ = [k for k in sorted(shared) if len({_hashable(d[k]) for d in data}) > 1]
    hparams = {k for d in data for k in d if "." not in k}
    differ = [k for k in differ if "." not in k or not _repeated(k, hparams)] or differ
    if not differ:
        return ""
    kinds: dict[str, list[str]] = {}
    for (label, r), d in zip(runs, data, strict=True):
        kind = ", ".join(f"{k}={_shown(d[k])}" for k in differ)
        kinds.setdefault(kind, []).append(f"{label} seed {r.hparams.get('seed')}")
    parts = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in kinds.items())
    what = "runs differ in what they trained or were validated on, so their losses per token do not compare"
    return f"Data: WARNING: {what}; {parts}"


def _shown(value) -> str:
    """A setting as an error names it: "" (a split not read from a file) as none, a SHA-256 by its first
    12 digits, which tell files apart."""
    if value == "":
        return "none"
    text = str(value)
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
        return text[:12] + "..."
    return text


def _repeated(option: str, hparams: set[str]) -> bool:
    """Whether a hyperparameter records what a config option says (its last name, or the head's)."""
    last = option.rpartition(".")[2]
    return option.startswith("model.head") or any(k == last or k.endswith(f"/{last}") for k in hparams)


def uneven(runs: list[RunLog]) -> str:
    """Which runs were last validated after how many steps, and what to do: their final values are of
    different budgets, and a mean of them (or a difference) belongs to none."""
    at = ", ".join(f"{r.validated_at() or 0:,} steps ({_named(r)})" for r in runs)
    return (
        f"{at}: their final values are of different budgets; train them to one length first, or give "
        "--step N to compare them as they stood after N steps"
    )


def at_step(runs: list[RunLog], step: int) -> tuple[list[RunLog], str]:
    """The runs as they stood after ``step`` steps (:meth:`RunLog.until`), and which of them logged no
    validation then ("" if all did): their values there would be of another budget."""
    if step < 1:
        return runs, f"--step {step}: give a number of steps trained, 1 or more"
    cut = [r.until(step) for r in runs]
    missing = [f"{_named(r)} ({r.path.name})" for r in cut if r.validated_at() != step]
    if not missing:
        return cut, ""
    named = ", ".join(missing)
    return cut, f"no validation after {step:,} steps in {named}; give a step every run validated at"


def unrecorded(runs: list[RunLog], keys: list[str]) -> str:
    """The ``--by`` keys that no run records ("" if every key is recorded by some run): grouped by them,
    every run would read as ``key=None``."""
    missing = [k for k in keys if all(k not in r.hparams and k not in r.config for r in runs)]
    if not missing:
        return ""
    return (
        f"--by {' '.join(missing)}: no run records it; give a hyperparameter of the runs' hparams.yaml "
        "(e.g. tokenizer, train_set_tokens) or an option of their config.yaml (e.g. model.backbone.d_model)"
    )
