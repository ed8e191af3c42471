"""What a sweep runs, checked before the first run starts: its runs (heads x seeds x grid values), each
named after what it trains, and the widths that give every head one parameter count
(``--match-params``). ``tools/sweep.py`` runs them."""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Run:
    head: str
    seed: int
    overrides: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """``<head>-seed<seed>[-<key>=<value>...]``, one folder name: a path's slashes become ``_``."""
        parts = [f"{self.head}-seed{self.seed}"]
        parts += [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in self.overrides.items()]
        return "-".join(parts).replace("/", "_")


def matched_widths(configs: list[str], heads: list[str], extra: list[str]) -> dict[str, dict[str, str]]:
    """For each head the width ``d_model`` whose unique parameter count is closest to the largest count
    among the heads at the configured width, as option overrides; an error beyond 1% of it, so that any
    two heads are within 2% of each other. Any width is
    allowed; the number of attention heads becomes the divisor of it nearest the configured one (it
    does not change the parameter count)."""
    import bisect
    import functools
    from dataclasses import replace

    import torch

    from lmheads.cli import main
    from lmheads.heads.base import resolve_head
    from lmheads.heads.names import expand_head_names
    from lmheads.module import LMHeadModule
    from lmheads.reporting import parameter_counts

    cli = main([arg for c in configs for arg in ("--config", c)] + list(extra), run=False)
    backbone, vocab = cli.model.cfg, cli.datamodule.vocab_size

    def attention_heads(width: int) -> int:
        even = backbone.positions == "rope"  # rotary embeddings need an even head width
        ok = [n for n in range(1, width + 1) if width % n == 0 and not (even and (width // n) % 2)]
        return min(ok, key=lambda n: (abs(n - backbone.n_head), -n))

    @functools.cache  # the bisection and the choice between its two neighbours ask for some twice
    def count(head: str, width: int) -> int:
        cls = resolve_head(expand_head_names([f"--model.head={head}"])[0].partition("=")[2])
        cfg = replace(backbone, d_model=width, n_head=attention_heads(width))
        with torch.device("meta"):  # sizes only, no memory
            return parameter_counts(LMHeadModule(head=cls(), backbone=cfg, vocab_size=vocab))["total"]

    target = max(count(h, backbone.d_model) for h in heads)
    overrides = {}
    for head in heads:
        widths = range(1, 4 * backbone.d_model + 1)
        above = bisect.bisect_left(widths, target, key=lambda w: count(head, w))  # counts grow with width
        width = min(widths[max(above - 1, 0) : above + 1], key=lambda w: abs(count(head, w) - target))
        params = count(head, width)
        if abs(params - target) > 0.01 * target:  # so that any two heads are within 2% of each other
            raise SystemExit(f"error: no width gives head {head} within 1% of {target:,} parameters")
        n_head = attention_heads(width)
        overrides[head] = {"model.backbone.d_model": str(width), "model.backbone.n_head": str(n_head)}
        print(
            f"{head}: d_model={width}, n_head={n_head}, {params:,} parameters (target {target:,})", flush=True
        )
    return overrides


def check_input(configs: list[str], heads: list[str], seeds=(), grid=(), extra=()) -> None:
    """Stops the sweep before any run starts (and before anything is written) on a config file that does
    not exist, a list of loggers (the options naming each run would reach its last one), a head that
    the runs could not build, or runs that :func:`check_runs` refuses."""
    import yaml

    logger = None
    for config in configs:
        if not Path(config).is_file():
            raise SystemExit(f"error: config file {config} not found")
        with contextlib.suppress(yaml.YAMLError, AttributeError):  # else the runs report the error
            trainer = yaml.safe_load(Path(config).read_text(encoding="utf-8")).get("trainer") or {}
            logger = trainer.get("logger", logger)
    if isinstance(logger, list):
        raise SystemExit(
            "error: the sweep names each run with --trainer.logger.init_args.* options, which go to the last "
            "logger of a list: give trainer.logger as the one TensorBoardLogger for a sweep"
        )
    from lmheads.errors import ConfigError

    sys.path.insert(0, os.getcwd())  # where `python -m lmheads`, in each run, finds a head of your own
    try:
        check_runs(heads, seeds, grid, extra)  # each head resolved to its class, or refused
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    finally:
        sys.path.remove(os.getcwd())


def check_options(commands: dict[str, list[str]]) -> None:
    """Stops the sweep before any run starts on options lmheads refuses (a grid key or value that is not
    an option of its type, a config that does not parse), with lmheads' own ``error:`` line and the run
    it is for: each run's command (by its name) is parsed as the run would parse it, building nothing."""
    from lmheads.cli import main

    sys.path.insert(0, os.getcwd())  # where `python -m lmheads`, in each run, finds a head of your own
    try:
        for name, cmd in commands.items():
            said, code = io.StringIO(), 0
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(said):
                try:
                    main([*cmd, "--print_config"])  # parses, prints the config and exits
                except SystemExit as exit:
                    code = exit.code
            if code in (0, None):
                continue
            lines = said.getvalue().splitlines()
            error = next((line for line in lines if line.startswith("error:")), "error: options refused")
            raise SystemExit(f"{error} (run {name}; no run was started)")
    finally:
        sys.path.remove(os.getcwd())


#: Options the sweep gives each run itself, so that its folder's name says what it ran: another value
#: for one (in --grid, or after --, a config file there included) would train a run its name belies.
OWN_OPTIONS = {
    "model": ({"head", "head.class_path"}, "the run's folder is named after it: give the heads with --heads"),
    "seed_everything": ({""}, "the run's folder is named after it: give the seeds with --seeds"),
    "trainer": (
        {"", "logger", "logger.class_path", "logger.save_dir", "logger.name", "logger.version"},
        "it names the run's folder: give --root and --name",
    ),
    "ckpt_path": ({""}, "each run continues from its own furthest checkpoint"),
}


def check_runs(heads: list[str], seeds: list[int], grid: list[str], extra: list[str]) -> None:
    """Stops the sweep on a run asked for twice (a head, seed or grid value given twice; a grid key given
    twice, where the last would silently win) and on an option that the sweep sets for each run."""
    from lmheads.cmdline import given_options
    from lmheads.heads import registered_heads
    from lmheads.heads.base import resolve_head
    from lmheads.heads.names import head_class_path

    by_name = {cls.__name__: cls for cls in registered_heads().values()}

    def head_class(head: str):  # the class a short name, class name or class path stands for
        return by_name.get(head) or resolve_head(head_class_path(head))

    classes = [head_class(h) for h in heads]
    keys = [item.partition("=")[0] for item in grid]
    named = {"--heads": (classes, heads), "--seeds": (seeds, seeds), "--grid": (keys, keys)}
    for what, (items, given) in named.items():
        twice = [str(given[i]) for i in range(len(items)) if items[i] in items[:i]]
        if twice:
            raise SystemExit(f"error: {what} names {', '.join(twice)} a second time; give each once")
    for item in grid:
        values = grid_values(item.partition("=")[2])
        if len(set(values)) < len(values):
            raise SystemExit(f"error: --grid {item} repeats a value; give each once")
    given = [*extra, *(f"--{key}=" for key in keys)]
    for section, (own, why) in OWN_OPTIONS.items():
        for key in given_options(given, section, "fit"):
            if key in own:
                option = f"{section}.{key}" if key else section
                raise SystemExit(
                    f"error: the sweep sets {option} for each run ({why}); take it out of --grid and of "
                    "the options after -- (config files given there included)"
                )


def grid_values(values: str) -> list[str]:
    """The values of one grid axis: split at the commas outside brackets, so that a list is one value
    (``[0.9,0.95],[0.9,0.99]`` is two values of ``model.betas``)."""
    found, depth, start = [], 0, 0
    for i, char in enumerate(values):
        depth += (char in "[({") - (char in "])}")
        if char == "," and depth == 0:
            found.append(values[start:i])
            start = i + 1
    return [*found, values[start:]]


def parse_grid(items: list[str]) -> list[dict[str, str]]:
    """``["a.b=1,2", "c=x"]`` -> every combination as a dict of overrides."""
    axes = []
    for item in items:
        key, sep, values = item.partition("=")
        split = grid_values(values)
        if not sep or not key or not all(split):
            raise SystemExit(f"error: --grid expects KEY=V1,V2,..., got {item!r}")
        axes.append([(key, v) for v in split])
    return [dict(combo) for combo in itertools.product(*axes)]
