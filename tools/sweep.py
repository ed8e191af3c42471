"""Run a grid of heads x seeds x config overrides with identical budgets, resumably.

    python tools/sweep.py --config configs/experiments/wikitext2_tying.yaml \\
        --heads tied untied tied_bias projected_tied --seeds 0 1 2 \\
        --grid model.backbone.d_model=128,256 --name wikitext2_tying

Every run is one ``python -m lmheads fit`` process with the same configuration except its head, seed
and grid values, logged to ``<root>/<name>/<head>-seed<seed>[-<grid values>]``. A run that finished
leaves ``sweep.json`` there and is skipped next time, and so is a run whose loss became NaN or infinite
(a result: ``compare.py`` names it and leaves it out; training it again from its last good checkpoint
would diverge again). A run that was interrupted resumes from its furthest checkpoint (``last.ckpt``,
``interrupted.ckpt`` or a SLURM requeue's). ``sweep.json`` records the run's options and its config
files' contents: a later call with other options (or an edited config) for a run already there is
refused for that run, which is left as it was, rather than skipped or resumed as if it were the run
asked for. ``--jobs N`` runs N at once; with ``--gpus 0,1,...`` each job gets one GPU. Afterwards,
``python tools/compare.py <root>/<name>`` tabulates and plots the runs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sweep_plan import Run, check_input, check_options, matched_widths, parse_grid

from lmheads.errors import ConfigError, file_in_the_way, mend
from lmheads.files import read_record, write_json
from lmheads.streams import pipe_safe_output


def command(run: Run, args: argparse.Namespace, run_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "lmheads", *options(run, args)]
    from lmheads.run.layout import furthest_checkpoint

    furthest = furthest_checkpoint(run_dir)  # by step: the newest file can be a stale interruption
    if furthest is not None:
        cmd.append(f"--ckpt_path={furthest[1]}")
    return cmd


def options(run: Run, args: argparse.Namespace) -> list[str]:
    """The run's ``python -m lmheads`` arguments, from ``fit`` on (without the checkpoint it resumes)."""
    cmd = ["fit"]
    for config in args.config:
        cmd += ["--config", config]
    cmd += [
        f"--model.head={run.head}",
        f"--seed_everything={run.seed}",
        f"--trainer.logger.init_args.save_dir={args.root}",
        f"--trainer.logger.init_args.name={args.name}",
        f"--trainer.logger.init_args.version={run.name}",
        "--trainer.enable_progress_bar=false",
        *args.extra,
    ]
    # the run's own values last, where they override what every run is given: its name says what it ran
    return cmd + [f"--{key}={value}" for key, value in run.overrides.items()]


def first_line(log: Path, start: str = "error:", offset: int = 0) -> str | None:
    """The first line of a run's log from byte ``offset`` (where one attempt's output begins: the log keeps
    every attempt's) that starts with ``start`` (``None`` if none)."""
    with contextlib.suppress(OSError), log.open("rb") as lines:
        lines.seek(offset)
        text = (line.decode(errors="replace") for line in lines)
        return next((line.strip() for line in text if line.startswith(start)), None)
    return None


def config_digests(configs: list[str]) -> dict[str, str]:
    """A SHA-256 of what each config file says (its parsed YAML: comments and layout aside): the options a
    run was given include its config files'."""
    import yaml

    def digest(text: str) -> str:
        with contextlib.suppress(yaml.YAMLError):  # else the run reports the error; its text stands for it
            text = json.dumps(yaml.safe_load(text), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    return {config: digest(Path(config).read_text(encoding="utf-8")) for config in configs}


def changed_options(record: dict, cmd: list[str], digests: dict[str, str]) -> str | None:
    """What differs between the options a run was recorded with and those of this call (the checkpoint
    it resumes from and the Python executable aside); ``None`` when nothing does."""

    def options(command: list[str]) -> list[str]:
        return [arg for arg in command[1:] if not arg.startswith("--ckpt_path=")]

    before, now = options(record.get("command", cmd)), options(cmd)
    changes = [f"{arg} then" for arg in before if arg not in now] + [
        f"{arg} now" for arg in now if arg not in before
    ]
    edited = [c for c, digest in record.get("configs", {}).items() if digests.get(c, digest) != digest]
    changes += [f"{config} edited since" for config in edited]
    return "; ".join(changes) or None


def diverged_step(run_dir: Path) -> int | None:
    """The step at which the run's training loss became NaN or infinite, from its ``diverged.json``
    (``None`` without one)."""
    from lmheads.run.layout import DIVERGED_FILE

    return read_record(run_dir / DIVERGED_FILE).get("step")


def thread_env(jobs: int) -> dict[str, str]:
    """CPU threads for each of ``jobs`` runs at once: an equal share of the cores (two runs with every
    core each on 2 cores take about 5x as long in total as one after the other). Runs on GPUs get their
    share too, as torchrun gives its processes one thread each: their CPU work is small, but N runs with
    a thread per core each would oversubscribe the cores. The share also bounds each run's pool of
    ``torch.compile`` workers (a worker process per core by default; with 1, it compiles in-process)."""
    if jobs <= 1:
        return {}
    share = str(max(1, (os.cpu_count() or 1) // jobs))
    return {"OMP_NUM_THREADS": share, "MKL_NUM_THREADS": share, "TORCHINDUCTOR_COMPILE_THREADS": share}


NOT_STARTED = "not started (the sweep was stopped)"
SETTLED = ("done", "skipped", "refused", "diverged")  # outcomes the same call again would not change


class Runs:
    """The runs in progress, each in a session of its own. SIGINT or SIGTERM to the sweep (Ctrl-C, a
    scheduler) is passed on to each of them exactly once, so each saves ``interrupted.ckpt`` and stops
    (a second Ctrl-C aborts them at once), the next call resumes them, and no further run starts."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: set[subprocess.Popen] = set()
        self.stopped: int | None = None  # the signal that stopped the sweep

    def stop(self, signum: int, frame=None) -> None:
        with self.lock:
            self.stopped = self.stopped or signum
            for process in self.running:
                process.send_signal(signum)

    def run(self, cmd: list[str], **kwargs) -> int | None:
        """The command's exit status; None if the sweep was stopped before it started."""
        with self.lock:
            if self.stopped:
                return None
            process = subprocess.Popen(cmd, start_new_session=True, **kwargs)
            self.running.add(process)
        try:
            return process.wait()
        finally:
            with self.lock:
                self.running.discard(process)


def execute(run: Run, args: argparse.Namespace, gpus: queue.Queue | None, runs: Runs) -> tuple[Run, str]:
    run_dir = Path(args.root) / args.name / run.name
    marker = run_dir / "sweep.json"
    cmd = command(run, args, run_dir)
    digests = config_digests(args.config)
    before = marker.read_text() if marker.is_file() else None
    try:
        record = read_record(marker) if before is not None else None
    except ConfigError as err:
        return run, f"refused: {err}"
    if record is not None:
        changed = changed_options(record, cmd, digests)
        if changed:
            return run, (
                f"refused: {run_dir} was {record.get('status', 'started')} with other options ({changed}); "
                "give the sweep another --name, or move that run away"
            )
        if record.get("status") == "done":
            return run, "skipped (done)"
        if record.get("status") == "diverged":
            return (
                run,
                f"skipped (diverged at step {diverged_step(run_dir)}; move the run away to train it again)",
            )
    if args.dry_run:
        return run, " ".join(cmd)
    from lmheads.run.claim import RunFolder

    holder = RunFolder(run_dir).holder()
    if holder is not None:  # another sweep (or command) trains it now: its outcome is that one's to record
        return run, f"busy (process {holder[0]} on {holder[1]}, started {holder[2]}, trains it now)"
    env = {**os.environ, **thread_env(args.jobs)}
    gpu = gpus.get() if gpus is not None else None
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    start = time.time()
    existed = run_dir.exists()
    try:
        if runs.stopped:
            return run, NOT_STARTED
        run_dir.mkdir(parents=True, exist_ok=True)
        with (run_dir / "sweep.log").open("a") as log:
            attempt = log.tell()  # where this attempt's output begins
            returncode = runs.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    finally:
        if gpu is not None:
            gpus.put(gpu)
    if returncode is None:
        return run, NOT_STARTED
    from lmheads.errors import NonFiniteLossError

    status = "done" if returncode == 0 else "interrupted" if returncode in (130, 143) else "failed"
    elsewhere = None
    if status == "done" and not (run_dir / "results.json").is_file():  # its loggers named another folder
        status, elsewhere = (
            "failed",
            first_line(run_dir / "sweep.log", "run:", attempt) or "no run: line in its log",
        )
    step = diverged_step(run_dir) if returncode == NonFiniteLossError.exit_code else None
    if step is not None:
        status = "diverged"  # a result, kept as it is
    outcome = {"status": status, "returncode": returncode, "seconds": round(time.time() - start, 1)}
    recorded = marker.read_text() if marker.is_file() else None
    # a failure of a run another process started at the same moment, or recorded since, is not its outcome
    if returncode != 0 and (RunFolder(run_dir).holder() is not None or recorded != before):
        return run, f"busy (another process trains it or has recorded it; see {marker})"
    error = first_line(run_dir / "sweep.log", offset=attempt) if status == "failed" else None
    if status == "failed" and elsewhere is None and not existed and os.listdir(run_dir) == ["sweep.log"]:
        shutil.rmtree(run_dir)  # it never started: no folder is left for it, the next call starts it anew
        for folder in (run_dir.parent, run_dir.parent.parent):  # <root>/<name>, <root>, where now empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        return run, f"failed before training (exit {returncode}): {error or 'no error line in its log'}"
    write_json(marker, {**outcome, "command": cmd, "configs": digests})
    seconds = outcome["seconds"]
    if status == "done":
        detail = f"{seconds} s"
    elif status == "interrupted":
        detail = f"after {seconds} s; the next call resumes it"
    elif status == "diverged":
        detail = f"at step {step}, after {seconds} s; compare.py names it"
    elif elsewhere is not None:
        detail = (
            f"exit 0, but it trained outside {run_dir} ({elsewhere}): the sweep names a run's folder through "
            "its TensorBoard or CSV logger, which its config must have"
        )
    else:
        detail = f"exit {returncode}{f': {error}' if error else ''}; see {run_dir / 'sweep.log'}"
    return run, f"{status} ({detail})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", action="append", required=True, help="lmheads config file(s), in order")
    parser.add_argument("--heads", nargs="+", required=True, help="head short names or class paths")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--grid", nargs="*", default=[],
        help="KEY=V1,V2 config overrides to cross (a list is one value: model.betas=[0.9,0.95],[0.9,0.99])",
    )  # fmt: skip
    parser.add_argument("--root", default="runs", help="TensorBoard root directory")
    parser.add_argument("--name", required=True, help="experiment name (a folder under the root)")
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs at once; on the CPU each gets its share of the cores"
    )
    parser.add_argument(
        "--gpus",
        default=None,
        help="comma-separated GPU ids, one per concurrent job; repeat an id to share a GPU among small "
        "runs (--gpus 0,0,0,0 --jobs 4)",
    )
    parser.add_argument(
        "--match-params",
        action="store_true",
        help="set model.backbone.d_model (and n_head, to divide it) of each head so that every model has "
        "the unique parameter count of the largest one at the configured width (within 2%%)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("extra", nargs="*", help="further lmheads options for every run (after --)")
    args = parser.parse_args(argv)
    if args.gpus is not None and not all(args.gpus.split(",")):  # a run given "" would see no GPU
        raise SystemExit(
            f"error: --gpus {args.gpus!r} has an empty GPU id; give ids and commas, e.g. --gpus 0,1"
        )
    if why := file_in_the_way(Path(args.root)):
        raise SystemExit(f"error: --root {why}; give another --root")
    grid = parse_grid(args.grid)
    check_input(args.config, args.heads, args.seeds, args.grid, args.extra)
    widths = {"model.backbone.d_model", "model.backbone.n_head"} & {k for combo in grid for k in combo}
    if args.match_params and widths:
        sizes = " and ".join(sorted(widths))
        raise SystemExit(f"error: --match-params sets {sizes} itself; take it out of --grid")
    matched = matched_widths(args.config, args.heads, args.extra) if args.match_params else {}
    runs = [Run(h, s, {**o, **matched.get(h, {})}) for o in grid for h in args.heads for s in args.seeds]
    check_options({run.name: options(run, args) for run in runs if run.seed == args.seeds[0]})
    if not args.dry_run:  # a read-only root: one line before any run, not a traceback at the first
        where = Path(args.root) / args.name
        try:  # where the folders would be made: nothing is left there
            tempfile.TemporaryFile(dir=next(p for p in (where, *where.parents) if p.exists())).close()
        except OSError as err:
            raise SystemExit(
                f"error: --root: {where} cannot be written ({err.strerror or err}); {mend(err)}, or give "
                "another --root"
            ) from None
    gpus = None
    if args.gpus:
        gpus = queue.Queue()
        for gpu in args.gpus.split(","):
            gpus.put(gpu)
        args.jobs = min(args.jobs, gpus.qsize())
    print(f"{len(runs)} runs -> {Path(args.root) / args.name}", flush=True)
    failed = refused = 0
    running = Runs()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, running.stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for run, outcome in pool.map(lambda r: execute(r, args, gpus, running), runs):
                print(f"{run.name}: {outcome}", flush=True)
                refused += outcome.startswith("refused")
                failed += not outcome.startswith(SETTLED) and not args.dry_run
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if failed:
        print(f"{failed} run(s) not done; the same command again resumes or retries them", file=sys.stderr)
    if refused:
        print(
            f"error: {refused} run(s) refused, as each one's line says; their folders are as they were",
            file=sys.stderr,
        )
    if running.stopped:
        return 128 + running.stopped
    return 1 if failed or refused else 0


if __name__ == "__main__":
    # A reader that goes first (`| head`, or `| tee log` and Ctrl-C) must not stop the sweep before its
    # runs are stopped and saved, nor turn its exit status into a traceback's.
    with pipe_safe_output():
        sys.exit(main())
