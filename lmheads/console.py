"""What a command prints: one line for bad input instead of a traceback or a page of usage, a progress
bar over the whole run, and no notices a user cannot act on (output that survives a closed pipe is in
:mod:`lmheads.streams`)."""

from __future__ import annotations

import difflib
import logging
import re
import sys
import time
import warnings
from pathlib import Path

import jsonargparse.typing
import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar as ProgressBarBase
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lmheads.cmdline import SUBCOMMANDS, configs_holding, option_values
from lmheads.dotted import flatten
from lmheads.errors import ConfigError, causes

#: Lightning messages (through its rank-zero logger) that advertise or describe its own internals.
QUIET_MESSAGES = (
    "💡 Tip:",  # advertisements for Lightning's cloud products
    "The following callbacks returned in `LightningModule.configure_callbacks` will override",
)


#: Lines every command would print that say nothing a user acts on: the seed (the run's folder is named
#: after it, and its hparams.yaml records it) and which accelerators exist (Lightning warns where a GPU
#: is there and not used).
ROUTINE_MESSAGES = ("Seed set to ", "GPU available: ", "TPU available: ", "HPU available: ")


#: Lines said once however often Lightning repeats them: max_time's timer says its time is up after every
#: batch until the step ends (lmheads stops there, not between a step's accumulated batches).
ONCE_MESSAGES = ("Time limit reached.",)


class _DropMessages(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self._said: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        once = next((m for m in ONCE_MESSAGES if message.startswith(m)), None)
        if once is not None:
            if once in self._said:
                return False
            self._said.add(once)
        return not message.startswith(QUIET_MESSAGES + ROUTINE_MESSAGES)


def quiet_lightning() -> None:
    """Drop Lightning's tips, routine lines and notices about its internals, and a deprecation inside
    Lightning's own code (``LeafSpec``); messages a user can act on stay."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # Evaluation metrics are reduced across processes by torchmetrics before they are logged, and the
    # head diagnostics come from weights equal on every process: Lightning's advice to log them with
    # sync_dist would only average equal numbers, once per metric and process.
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('(val|test|hp|diag)")
    # Only a resumed run writes into a checkpoint folder that has files (lmheads.run.claim refuses others).
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


def quiet_evaluation() -> None:
    """For ``validate``, ``test`` and ``predict``, which save no checkpoint: drop Lightning's warning that
    the checkpoint callback restored from the checkpoint now points at another folder than the run's
    checkpoints (so that its record of the best ones is not restored)."""
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from")


def plain_warnings() -> None:
    """Each warning as one line, ``warning: <message>``, without the file, line and source text it was
    raised at, which the user of a command cannot act on."""
    warnings.formatwarning = lambda message, category, filename, lineno, line=None: f"warning: {message}\n"


class ProgressBar(TQDMProgressBar):
    """One bar for the whole run when ``trainer.max_steps`` is set: optimizer steps out of ``max_steps``,
    starting where a resumed run stands, with an ETA for the rest (Lightning's bar counts the batches of
    the current epoch). No ``v_num``; the run folder is printed at the start and the end. On a GPU the
    bar refreshes every ``log_every_n_steps`` steps by default: each refresh reads the loss from the
    device, a host synchronisation.

    Args:
        refresh_rate: Refresh every this many steps (default: 1 on a CPU, ``log_every_n_steps`` on a GPU).
    """

    def __init__(self, refresh_rate: int | None = None) -> None:
        super().__init__(refresh_rate=1 if refresh_rate is None else refresh_rate)
        self._auto_refresh = refresh_rate is None

    @property
    def refresh_rate(self) -> int:
        trainer = getattr(self, "_trainer", None)
        if self._auto_refresh and trainer is not None and trainer.strategy.root_device.type == "cuda":
            return max(trainer.log_every_n_steps, 1)
        return super().refresh_rate

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def on_train_start(self, trainer: L.Trainer, *args) -> None:
        super().on_train_start(trainer, *args)
        if trainer.max_steps > 0:  # a resumed run may start mid-epoch, without on_train_epoch_start
            bar = self.train_progress_bar
            bar.reset(total=trainer.max_steps)
            bar.initial = bar.n = trainer.global_step  # the ETA counts this start's rate only
            bar.set_description(f"Epoch {trainer.current_epoch}")

    def on_train_epoch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.max_steps <= 0:  # no set length: Lightning's bar per epoch
            return super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.max_steps <= 0:
            return super().on_train_batch_end(trainer, pl_module, *args)
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is not None and not bar.disable and (step % self.refresh_rate == 0 or step == bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar


class ProgressLines(ProgressBarBase):
    """Progress as plain lines, for output that is not a terminal (a log file, a pipe, a batch job): a
    progress bar there is kilobytes of carriage returns and cursor escapes. A line every ``every``
    optimizer steps (default: a twentieth of ``trainer.max_steps``, at a logging step, so that it has the
    training loss; ``log_every_n_steps`` without ``max_steps``) and one after each validation.

    Args:
        every: Steps between lines (default: as above).
    """

    def __init__(self, every: int | None = None) -> None:
        super().__init__()
        self.every = every
        self._enabled = True
        self._started = 0.0
        self._first_step = 0
        self._last_shown = -1

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _interval(self, trainer: L.Trainer) -> int:
        if self.every is not None:
            return max(1, self.every)
        log = max(1, trainer.log_every_n_steps)
        if trainer.max_steps <= 0:
            return log
        return max(log, trainer.max_steps // 20 // log * log)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started, self._first_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step  # a batch that only accumulates gradients leaves it as it was
        if not self._enabled or step in (self._first_step, self._last_shown):
            return
        if step % self._interval(trainer) == 0 or step == trainer.max_steps:
            self._last_shown = step
            rate = (step - self._first_step) / max(time.perf_counter() - self._started, 1e-9)
            of = f"/{trainer.max_steps}" if trainer.max_steps > 0 else ""
            self.print(
                f"step {step}{of} epoch {trainer.current_epoch} {rate:.2f} steps/s "
                + self._shown(trainer, pl_module, "train/")
            )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled and not trainer.sanity_checking and trainer.state.fn == "fit":
            self.print(f"step {trainer.global_step} validation " + self._shown(trainer, pl_module, "val/"))

    def _shown(self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str) -> str:
        metrics = self.get_metrics(trainer, pl_module)
        return " ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in metrics.items()
            if k.startswith(prefix)
        )

    def print(self, *args, **kwargs) -> None:
        print(*args, **kwargs, flush=True)


def progress_display() -> ProgressBarBase:
    """A progress bar on a terminal; plain lines in a file or a pipe."""
    return ProgressBar() if sys.stderr.isatty() else ProgressLines()


def explain_parse_error(message: str, parser: LightningArgumentParser, args: list[str] | None = None) -> str:
    """The parser's complaint in one line; an unknown option with the closest valid ones."""
    names = (*SUBCOMMANDS, "heads", "export", "harness")
    commands = f"{', '.join(names[:-1])} or {names[-1]}"
    if 'expected "subcommand"' in message:
        return f"no command given: python -m lmheads {commands} (see --help)"
    if command := re.search(r"argument subcommand: invalid choice: '(.*?)'", message):
        close = difflib.get_close_matches(command.group(1), names, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        return f"unknown command {command.group(1)!r}; {hint}python -m lmheads {commands} (see --help)"
    unknown = re.search(  # on the command line; in a config file (a section's or a command's key)
        r"unrecognized arguments: --([\w.]+)|"
        r"(?:(Group|Subcommand) '([\w.]+)' )?does not accept option '([\w.]+)'",
        message,
    )
    if unknown is None:
        return _explain_bad_value(message, args or [])
    kind, group, option = unknown.group(2, 3, 4)
    key = unknown.group(1) or (f"{group}.{option}" if kind == "Group" else option)
    files = [] if unknown.group(1) else configs_holding(args or [], key)  # a key of a config file
    where = f" (in {', '.join(files)})" if files else ""
    known = {prefix for k in flatten(parser.get_defaults().as_dict()) for prefix in _prefixes(k)}
    parent, _, name = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in known if parent and k.rpartition(".")[0] == parent}
    if siblings:  # a known section: the names in it closest to the mistyped one
        close = [siblings[n] for n in difflib.get_close_matches(name, siblings, n=3, cutoff=0.6)]
    else:
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = (
        f"; did you mean {', '.join('--' + k for k in close)}?" if close else "; see --help for the options"
    )
    return f"unknown option --{key}{where}{hint}"


def _prefixes(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _explain_bad_value(message: str, args: list[str]) -> str:
    """jsonargparse's multi-line report of a bad value, as one line: the option, the value given, and what
    it expected (a type, or what was wrong with a file or a class's options)."""
    keys = re.findall(r'Parser key "([\w.]+)"', message)
    if not keys:
        return " ".join(message.split()) + " (see --help)"
    option = "--" + ".".join(dict.fromkeys(keys))  # an option of a class given: its key within the class
    given = re.findall(r"(?:Got value|Given value): (.*)$", message, flags=re.MULTILINE)
    if not given and "Not of type" in message:  # a restricted number: the value as the command line gave it
        given = option_values(args, option)[-1:]
    value = f" {given[0].strip()!r}" if given and "NestedArg(" not in given[0] else ""
    refused = re.search(
        r"Problem with given class_path '([\w.]+)':\s*Option '(\w+)' is not accepted", message
    )
    if refused:
        cls, name = refused.group(1).rsplit(".", 1)[-1], refused.group(2)
        return f"{cls} has no option '{name}' ({option}.{name}); {option}.help {cls} lists its options"
    required = re.search(
        r"Problem with given class_path '([\w.]+)':\s*the following arguments are required: (.+)$",
        message,
        flags=re.MULTILINE,
    )
    if required:
        cls, names = required.group(1).rsplit(".", 1)[-1], required.group(2).strip()
        where = " (lmheads writes a logger into the run's folder, so any save_dir does)"
        return (
            f"{cls} in {option} needs {names}: give it in the class's init_args, e.g. "
            f"{{class_path: {cls}, init_args: {{{names.split(',')[0]}: ...}}}}"
            + (where if option == "--trainer.logger" and "save_dir" in names else "")
        )
    # a restricted type (PositiveInt, ClosedUnitInterval, ...): its name and condition, from the type
    expected = [_restricted(name) for name in re.findall(r"Not of type (\w+):", message)]
    if "NoneType" in message and expected:
        expected.append("null")
    for what in re.findall(r"Expected a (.+?)(?:\. Got value:.*)?$", message, flags=re.MULTILINE):
        if what.startswith("path but "):
            what = "config file"
        elif what.startswith("dot import path string"):
            what = "class path"
        what = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", what)
        what = re.sub(r"typing\.Literal\[(.*)\]", r"one of \1", what)
        if what != "NoneType" and what not in expected:
            expected.append(what)
    if expected:
        return f"invalid value{value} for {option}: expected {' or '.join(expected)}"
    # No type to name: the parser's first reason (a missing file, a config it could not load).
    after = message.split(f'Parser key "{keys[-1]}":', 1)[1]
    reasons = [line.strip().removeprefix("- ") for line in after.splitlines() if line.strip()]
    reason = f": {reasons[0]}" if reasons else ""
    return f"invalid value{value} for {option}{reason}"


def _restricted(name: str) -> str:
    """A jsonargparse restricted number type by its name, with the condition it holds (``v>0``)."""
    expression = getattr(getattr(jsonargparse.typing, name, None), "_expression", None)
    return f"{name} ({expression})" if expression else name


def user_error(err: BaseException | None) -> str | None:
    """What to tell the user about ``err`` in one line: a ``ConfigError`` behind it (jsonargparse wraps
    errors raised while instantiating) or Lightning's complaint about the trainer's settings (its
    ``MisconfigurationException``, a ``ValueError`` its trainer or loops raise when they check them, or
    its ``ModuleNotFoundError`` for a setting whose package is missing), or a ``RuntimeError`` one of its
    callbacks raises on its settings (``EarlyStopping`` monitoring a metric no run logs);
    ``None`` for anything else (a bug: its traceback is shown)."""
    for cause in causes(err):
        if isinstance(cause, ConfigError):
            return str(cause)
        if _raised_in(cause, RuntimeError, ("callbacks",)):
            return " ".join(str(cause).split()) + " (a callback's setting)"
        if isinstance(cause, MisconfigurationException) or _trainer_value_error(cause) or _unmet(cause):
            if "gpu" in str(cause).lower() and not torch.cuda.is_available():
                return (
                    "trainer.accelerator asks for a GPU and torch sees none here; use "
                    "--trainer.accelerator=cpu (or auto)"
                )
            return " ".join(str(cause).split()) + " (a trainer setting)"
    return None


def _unmet(err: BaseException) -> bool:
    """Lightning's refusal of a setting whose package is not installed (``torch_xla`` for
    ``accelerator=tpu``, ``transformer_engine`` for its precision): "Requirement '...' not met"."""
    return (
        isinstance(err, ModuleNotFoundError) and re.match(r"Requirement '.+' not met", str(err)) is not None
    )


def _trainer_value_error(err: BaseException) -> bool:
    """A ``ValueError`` raised in Lightning's trainer or loops: how they refuse settings that do not fit
    together (``val_check_interval`` longer than an epoch, ``ckpt_path`` keywords with nothing to find)."""
    return _raised_in(err, ValueError, ("trainer", "loops"))


def _raised_in(err: BaseException, kind: type[BaseException], packages: tuple[str, ...]) -> bool:
    """Whether ``err`` is a ``kind`` raised by Lightning's own code in one of ``packages`` of
    ``lightning.pytorch`` (the last frame of its traceback there)."""
    if not isinstance(err, kind) or err.__traceback__ is None:
        return False
    tb = err.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    parts = Path(tb.tb_frame.f_code.co_filename).parts
    return any(
        parts[i : i + 3] in {("lightning", "pytorch", p) for p in packages} for i in range(len(parts) - 2)
    )
