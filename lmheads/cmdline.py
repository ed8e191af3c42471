"""The command line as given, read before the parser reads it: the values of an option, the options
a command sets (on the command line and in its ``--config`` files), and YAML errors in those files."""

from __future__ import annotations

from pathlib import Path

import yaml

from lmheads.errors import ConfigError


def option_values(args: list[str], option: str) -> list[str]:
    """The values given to ``option`` on a command line (``--option=value`` or ``--option value``), in
    order."""
    values = []
    for i, arg in enumerate(args):
        if arg.startswith(f"{option}="):
            values.append(arg.partition("=")[2])
        elif arg == option and i + 1 < len(args):
            values.append(args[i + 1])
    return values


def _option_pairs(args: list[str]):
    """Each argument of a command line as ``(option, value)``: ``--option=value``, or ``--option`` with
    the next argument ("" after the last)."""
    for i, arg in enumerate(args):
        option, has_value, value = arg.partition("=")
        yield option, value if has_value else (args[i + 1] if i + 1 < len(args) else "")


def take_options(args: list[str], options: set[str]) -> tuple[list[str], list[tuple[str, str]], int]:
    """``args`` without the ``options`` (``--option=value`` or ``--option value``), the ``(option,
    value)`` pairs taken, in order, and where in what is left the first one was (-1: none)."""
    rest: list[str] = []
    taken: list[tuple[str, str]] = []
    at, skip = -1, False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        option, has_value, value = arg.partition("=")
        if option not in options:
            rest.append(arg)
            continue
        if not has_value and i + 1 < len(args):
            value, skip = args[i + 1], True
        taken.append((option, value))
        at = len(rest) if at < 0 else at
    return rest, taken, at


#: Trainer options that take a whole number as a number of batches and a fraction as a share of them
#: (Lightning's documentation), which the parser turns into floats: ``1`` would mean all of them.
BATCH_COUNTS = (
    "limit_train_batches",
    "limit_val_batches",
    "limit_test_batches",
    "limit_predict_batches",
    "overfit_batches",
)


def batch_counts(args: list[str], subcommand: str) -> dict[str, int]:
    """The options of :data:`BATCH_COUNTS` that a command line (or its ``--config`` files) last gives as a
    whole number, without a decimal point, as ints."""
    found: dict[str, int] = {}
    for option, value in _option_pairs(args):
        if option == "--config":
            trainer = _config_section(value, subcommand, "trainer")
            given = {k: trainer[k] for k in BATCH_COUNTS if isinstance(trainer, dict) and k in trainer}
        elif option.removeprefix("--trainer.") in BATCH_COUNTS:
            given = {option.removeprefix("--trainer."): value.strip()}
        else:
            continue
        for key, value in given.items():
            if type(value) is int or (isinstance(value, str) and value.isdigit()):
                found[key] = int(value)
            else:
                found.pop(key, None)
    return found


def _loaded(value: str):
    """A ``--config`` value: a YAML file's content, or inline YAML (``None`` where it does not load)."""
    try:
        text = Path(value).read_text(encoding="utf-8") if Path(value).is_file() else value
        return yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError):  # the parser says what is wrong with it
        return None


def _config_section(value: str, subcommand: str, section: str):
    """A section of a ``--config`` file (given before or after the subcommand), or ``None``."""
    content = _loaded(value)
    if isinstance(content, dict) and isinstance(content.get(subcommand), dict):
        content = content[subcommand]  # a config given before the subcommand
    return content.get(section) if isinstance(content, dict) else None


#: LightningCLI's commands, under which a config file given before the command nests its options.
SUBCOMMANDS = ("fit", "validate", "test", "predict")


def configs_holding(args: list[str], key: str) -> list[str]:
    """The ``--config`` files of a command line that set the dotted ``key`` (or an option under it),
    given before the subcommand or after it."""

    def keys(value, prefix: str = ""):
        for name, item in value.items() if isinstance(value, dict) else ():
            yield f"{prefix}{name}"
            yield from keys(item, f"{prefix}{name}.")

    holding = []
    for value in option_values(args, "--config"):
        given = set(keys(_loaded(value))) if Path(value).is_file() else set()
        if key in given or any(f"{command}.{key}" in given for command in SUBCOMMANDS):
            holding.append(value)
    return holding


def given_options(args: list[str], section: str, subcommand: str) -> list[str]:
    """The options of ``section`` that a command line sets, by the options it names (``--model.lr``,
    ``--model``) and the keys of its ``--config`` files, dotted and without ``init_args``
    (``--model.head.init_args.bias`` gives ``head.bias``; ``--model.head`` gives ``head``; ``--model``
    the whole section, as ``""``). A value set to its default is set all the same."""
    keys: list[str] = []

    def add(value, prefix: str) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                if key != "init_args":
                    add(item, f"{prefix}.{key}" if prefix else str(key))
                else:
                    add(item, prefix)
        else:
            keys.append(prefix)

    for option, value in _option_pairs(args):
        if option == "--config":
            section_value = _config_section(value, subcommand, section)
            if section_value is not None:
                add(_loaded(section_value) if isinstance(section_value, str) else section_value, "")
        elif option == f"--{section}":
            keys.append("")
            if isinstance(given := _loaded(value), dict):  # its keys too: YAML, or a file of it
                add(given, "")
        elif option.startswith(f"--{section}."):
            keys.append(".".join(k for k in option.split(".")[1:] if k != "init_args"))
    return keys


#: Options the CLI sets from another option (its links), with what the data takes from the model.
LINKED = {"data.block_size": ("model.backbone.block_size", "the model's context length")}


def check_linked(args: list[str], subcommand: str) -> None:
    """A linked option given all the same: the parser would overwrite it without a word (a link into a
    subclass's ``init_args`` is not refused as the others are)."""
    for target, (source, what) in LINKED.items():
        section, _, key = target.partition(".")
        if key in given_options(args, section, subcommand):
            raise ConfigError(f"{target} is set from {source} ({what}): give --{source} instead")


def check_ckpt_path_kept(args: list[str], parsed: str | None) -> None:
    """A ``--config`` given after ``--ckpt_path`` sets it to its own ``ckpt_path`` (a saved config's
    ``null``): the command would evaluate an untrained model, or train anew, instead of the checkpoint."""
    given = option_values(args, "--ckpt_path")
    if not given:
        return
    wanted = None if given[-1] in ("", "null", "None") else given[-1]
    if wanted != (None if parsed is None else str(parsed)):
        raise ConfigError(
            f"--ckpt_path={given[-1]} is replaced by a --config given after it (its ckpt_path: "
            f"{'null' if parsed is None else parsed}): give --ckpt_path after the last --config"
        )


def check_config_files(args: list[str]) -> None:
    """A YAML syntax error in a ``--config`` file, named with the file, line and column."""
    for path in option_values(args, "--config"):
        if not Path(path).is_file():
            continue  # not a file (inline YAML) or missing: the parser says so
        try:
            yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"{path}{where}: {problem} (YAML syntax)") from None
