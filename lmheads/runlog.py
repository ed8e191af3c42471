"""Runs read back from their folders, for analysis: the logged scalars, the hyperparameters, the test of
a checkpoint filed in the run, and whether the run diverged.

    from lmheads.runlog import find_runs
    runs = find_runs([Path("runs/wikitext2_tying")])
    {r.path.name: r.final("val/loss") for r in runs}

A run resumed from a checkpoint has several event files: they are read in order, later values win for a
repeated step, and wall-clock time excludes the pause between them. ``tools/compare.py``,
``tools/buckets.py`` and ``tools/data_regime.py`` build their tables on these.
"""

from __future__ import annotations

import json
import re
import struct
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

from lmheads.dotted import flatten
from lmheads.files import read_record
from lmheads.harness import HARNESS
from lmheads.run.layout import DIVERGED_FILE, EVALUATED_FILE, RESULTS_FILE

#: Subfolders of a run in which lmheads files the evaluations of its checkpoints.
EVALUATIONS = ("validate", "test", "predict", HARNESS)

#: Options of a run's config that change neither what it trains nor what it measures: its seed and its
#: length (the seed column and the budget line report them), its name and place, what it prints and
#: samples, the checkpoint it started from, where it runs (the devices' tokens per step are in its
#: hyperparameters), compilation, when it validates, and where and with how many processes its data is
#: prepared.
BOOKKEEPING = re.compile(
    r"(seed_everything|ckpt_path|weights_only|sampling|model\.(lr_decay_steps|compile|compile_loss)"
    r"|data\.init_args\.(num_workers|cache_dir|num_proc)"
    r"|trainer\.(logger|default_root_dir|max_steps|max_epochs|max_time|min_steps|min_epochs"
    r"|enable_progress_bar|enable_model_summary|enable_checkpointing|log_every_n_steps"
    r"|num_sanity_val_steps|val_check_interval|check_val_every_n_epoch|profiler|enable_autolog_hparams"
    r"|model_registry|detect_anomaly|inference_mode|benchmark|deterministic|accelerator|strategy|devices"
    r"|num_nodes|sync_batchnorm))(\.|$)"
)

#: Callbacks, by class name, that keep or report a run without changing what it trains: which checkpoints
#: it keeps, what it monitors and prints, and when it stops (its length, which the budget line reports).
BOOKKEEPING_CALLBACKS = frozenset(
    {
        "ModelCheckpoint", "RunCheckpoint", "EarlyStopping", "Timer", "LearningRateMonitor",
        "DeviceStatsMonitor", "TQDMProgressBar", "RichProgressBar", "ModelSummary", "RichModelSummary",
    }
)  # fmt: skip


def _training_callbacks(callbacks: str | None) -> str | None:
    """A run's ``trainer.callbacks`` (JSON text, as its config is read) less those that only keep or
    report it; ``None`` if that is all."""
    given = json.loads(callbacks) if isinstance(callbacks, str) else callbacks
    given = given if isinstance(given, list) else [given] if given else []

    def bookkeeping(callback) -> bool:
        name = str(callback.get("class_path", "")) if isinstance(callback, dict) else ""
        return name.rpartition(".")[2] in BOOKKEEPING_CALLBACKS

    kept = [c for c in given if not bookkeeping(c)]
    return json.dumps(kept) if kept else None


TEST_TAGS = ("test/", "test_freq/")  # an evaluation's scalars, logged at its step 0


@dataclass
class RunLog:
    """One run as its folder records it: its ``hparams.yaml``, its ``config.yaml`` and every scalar it
    logged (with the test of its checkpoint, where one is filed in the run)."""

    path: Path
    hparams: dict
    scalars: dict[str, dict[int, tuple[float, float]]]  # tag -> step -> (value, seconds since start)
    final_step: int = 0  # where fit last ended (results.json), beyond the last logged step when not logged
    diverged_at: int | None = None  # the step its training loss became NaN or infinite (diverged.json)
    config: dict = field(default_factory=dict)  # its config.yaml, flat (``model.lr``), where it has one
    tested_at: int | None = None  # the step of the checkpoint whose test its ``test/`` scalars are
    harness: dict[str, float] = field(default_factory=dict)  # lm-eval's results of its last.ckpt
    damaged: list[str] = field(default_factory=list)  # its event files with a record that fails its checksum

    def setting(self, key: str):
        """A hyperparameter (``hparams.yaml``: ``lr``) or an option of its config (``model.min_lr_ratio``)."""
        return self.hparams[key] if key in self.hparams else self.config.get(key)

    def settings(self) -> dict:
        """What makes the run the configuration it is: its hyperparameters and every option of its config
        that changes what it trains or measures (:data:`BOOKKEEPING` aside; a data file by its name,
        since a copy elsewhere holds the same text), but not its seed or its length (the budget)."""
        options = {
            k: Path(v).name if k.endswith("_file") and isinstance(v, str) else v
            for k, v in self.config.items()
            if not BOOKKEEPING.match(k)
        }
        if "trainer.callbacks" in options:
            options["trainer.callbacks"] = _training_callbacks(options["trainer.callbacks"])
        budget = {"seed", "max_steps", "lr_decay_steps"}
        return {**{k: v for k, v in self.hparams.items() if k not in budget}, **options}

    def series(self, tag: str) -> list[tuple[int, float, float]]:
        """(step, value, seconds since the run started) for each logged value of ``tag``, by step."""
        return sorted((step, v, t) for step, (v, t) in self.scalars.get(tag, {}).items())

    def steps(self) -> int:
        """Optimizer steps trained: one more than the last step a value was logged at (logged steps
        count from 0), or the step ``fit`` ended at if later."""
        logged = max((max(points) for points in self.scalars.values() if points), default=-1) + 1
        return max(logged, self.final_step)

    def final(self, tag: str) -> float | None:
        """The last logged value of ``tag`` (None if the run never logged it)."""
        values = self.series(tag)
        return values[-1][1] if values else None

    def validated_at(self) -> int | None:
        """The optimizer steps trained when its last validation ran, which its final values are of."""
        values = self.series("val/loss")
        return values[-1][0] + 1 if values else None  # logged at step s after s + 1 optimizer steps

    def until(self, step: int) -> RunLog:
        """The run as it stood after ``step`` optimizer steps: what it logged until then, and its test only
        where the tested checkpoint was of that step or earlier."""
        tested = self.tested_at is not None and self.tested_at <= step
        scalars = {
            tag: points if tag.startswith(TEST_TAGS) else {s: p for s, p in points.items() if s < step}
            for tag, points in self.scalars.items()
            if tested or not tag.startswith(TEST_TAGS)
        }
        final = min(self.final_step, step)
        return replace(self, scalars=scalars, final_step=final, tested_at=self.tested_at if tested else None)

    def best(self, tag: str) -> tuple[float, int] | tuple[None, None]:
        """The lowest value of a series and the optimizer steps trained when it was logged."""
        values = self.series(tag)
        if not values:
            return None, None
        step, value, _ = min(values, key=lambda point: point[1])
        return value, step + 1  # a validation logged at step s follows s + 1 optimizer steps

    def minutes(self) -> float | None:
        """Wall-clock minutes from the first logged value to the last, pauses between sessions excluded."""
        times = [t for points in self.scalars.values() for _, t in points.values()]
        return max(times) / 60 if times else None

    @property
    def label(self) -> str:
        """The head and the options it was given other than its defaults: ``untied (bias=True)``."""
        options = json.loads(self.hparams.get("head_options", "{}") or "{}")
        defaults = _default_options(str(self.hparams.get("head")))
        changed = {k: v for k, v in options.items() if defaults.get(k, object()) != v}
        extra = ", ".join(f"{k}={v}" for k, v in sorted(changed.items()))
        return f"{self.hparams.get('head')}" + (f" ({extra})" if extra else "")


def _default_options(head: str) -> dict:
    try:
        from lmheads.heads import head_class

        return head_class(head)().options()
    except Exception:  # a head that is not importable here: show all its options
        return {}


def _event_files(run_dir: Path) -> list[Path]:
    def created(path: Path) -> float:
        parts = path.name.split(".")
        return float(parts[3]) if len(parts) > 3 and parts[3].isdigit() else path.stat().st_mtime

    return sorted(run_dir.glob("events.out.tfevents.*"), key=created)


def damaged_at(events: Path) -> int | None:
    """The byte at which a complete record of an event file fails its checksum (None if none does).
    TensorBoard stops reading a file there without a word, so what follows is lost to it; a record cut
    short at the end (a run killed while it wrote) is not damage."""
    data = events.read_bytes()
    at = 0
    while at + 12 <= len(data):
        header, header_crc = data[at : at + 8], struct.unpack("<I", data[at + 8 : at + 12])[0]
        if masked_crc32c(header) != header_crc:
            return at
        end = at + 12 + struct.unpack("<Q", header)[0]
        if end + 4 > len(data):
            return None
        if masked_crc32c(data[at + 12 : end]) != struct.unpack("<I", data[end : end + 4])[0]:
            return at
        at = end + 4
    return None


def load_run(run_dir: Path, test_checkpoint: str = "last") -> RunLog:
    """The run in ``run_dir``, with the test of its ``test_checkpoint`` (see :func:`test_evaluation`)."""
    scalars: dict[str, dict[int, tuple[float, float]]] = defaultdict(dict)
    offset = 0.0
    damaged = []
    for events in _event_files(run_dir):
        if (at := damaged_at(events)) is not None:
            damaged.append(f"{events.relative_to(run_dir)} from byte {at:,} of {events.stat().st_size:,}")
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})  # 0: keep every point
        acc.Reload()
        points = {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}
        times = [e.wall_time for evs in points.values() for e in evs]
        if not times:
            continue
        start = min(times)
        for tag, evs in points.items():
            for e in evs:
                scalars[tag][e.step] = (e.value, offset + e.wall_time - start)
        offset += max(times) - start
    final_step = read_record(run_dir / RESULTS_FILE).get("step", 0)
    diverged_at = read_record(run_dir / DIVERGED_FILE).get("step")
    run = RunLog(
        run_dir, _hparams(run_dir), dict(scalars), final_step, diverged_at, _config(run_dir), damaged=damaged
    )
    harness = test_evaluation(run_dir, "last", run.steps(), kind=HARNESS)  # lm-eval's of its last.ckpt
    if harness is not None:
        metrics = read_record(harness / "results.json").get("metrics", {})
        run.harness = {f"lm-eval {key}": value for key, value in metrics.items()}
    evaluation = test_evaluation(run_dir, test_checkpoint, run.steps())
    if evaluation is not None:  # the test split, from `python -m lmheads test --ckpt_path=<run>/...`
        tested = load_run(evaluation)
        run.damaged += [f"{evaluation.relative_to(run_dir)}/{file}" for file in tested.damaged]
        for tag, points in tested.scalars.items():
            if tag.startswith(TEST_TAGS):
                run.scalars[tag] = points
        named = re.fullmatch(r"step(\d+)(-\d+)?", evaluation.name)  # step<N>.ckpt, for those not recording it
        run.tested_at = _evaluated(evaluation).get("step", int(named[1]) if named else None)
    return run


def _evaluated(folder: Path) -> dict:
    """What an evaluation recorded of the checkpoint it read: its step, and any data other than the run's
    (evaluations from before lmheads recorded it have nothing)."""
    return read_record(folder / EVALUATED_FILE)


def _hparams(folder: Path) -> dict:
    return read_record(folder / "hparams.yaml")


def _config(folder: Path) -> dict:
    """The run's ``config.yaml`` (the options it started with) as flat keys; lists as JSON text."""
    config = read_record(folder / "config.yaml")
    return flatten(config, as_text=True) if config else {}


#: What an evaluation of each kind leaves once it has run: test's event files, lm-eval's results.
_FILED = {"test": "events.out.tfevents.*", HARNESS: "results.json"}


def test_evaluation(
    run_dir: Path, checkpoint: str = "last", last_step: int | None = None, kind: str = "test"
) -> Path | None:
    """The run's newest evaluation (``kind``: ``test``, or lm-eval's ``harness``) of a checkpoint on the
    run's data: ``last`` (the state the table's
    other columns end at, ``last_step``; an evaluation of another checkpoint, or of ``last.ckpt`` before
    the run went on, is not it), or ``best``, the checkpoint of the lowest validation loss that ``fit``
    recorded in results.json (a run stopped before the end has none: then the newest evaluation of a
    ``step<N>`` checkpoint, which is what the checkpoint callback keeps for the lowest validation loss)."""
    folders = [
        p
        for p in (run_dir / kind).glob("*")
        if any(p.glob(_FILED[kind])) and not _evaluated(p).get("other_data")  # the run's data
    ]
    if checkpoint == "best":
        best = read_record(run_dir / RESULTS_FILE).get("best_checkpoint")
        name = re.escape(Path(best).stem) if best else r"step\d+"
        folders = [p for p in folders if re.fullmatch(rf"{name}(-\d+)?", p.name)]
        return max(folders, key=lambda p: p.stat().st_mtime, default=None)
    last = [p for p in folders if re.fullmatch(r"last(-\d+)?", p.name)]
    if last_step is not None:  # evaluations that recorded their checkpoint's step (older ones did not)
        last = [p for p in last if _evaluated(p).get("step", last_step) == last_step]
    return max(last, key=lambda p: p.stat().st_mtime, default=None)


def _is_evaluation(folder: Path) -> bool:
    return folder.parent.name in EVALUATIONS and (folder.parent.parent / "hparams.yaml").is_file()


def find_runs(roots: list[Path], test_checkpoint: str = "last") -> list[RunLog]:
    """lmheads runs under the roots, validated or not (:func:`lmheads.comparable.split_reportable` sets
    apart the runs a table leaves out); evaluations filed inside a run (``<run>/test/...``) are not runs."""
    dirs = sorted({p.parent for root in roots for p in root.rglob("events.out.tfevents.*")})
    runs = [load_run(d, test_checkpoint) for d in dirs if not _is_evaluation(d)]
    return [r for r in runs if r.hparams.get("head")]


def natural(text: str) -> list:
    """Sort key in which numbers compare as numbers (``tokens=16384`` before ``tokens=131072``)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]
