"""Heads by name: short names (``untied``) on the command line and in config files, and the ``heads``
listing of every available head."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from jsonargparse import get_loader

from lmheads.errors import ConfigError
from lmheads.heads.base import Head, broken_heads, registered_heads, resolve_head

HEAD_KEY = "--model.head"


def expand_head_names(args: list[str]) -> list[str]:
    """Turn ``--model.head=untied`` (or ``--model.head untied``) into the head's class path.

    Class names of registered heads, YAML/JSON values and ``--model.head.*`` options pass through
    untouched; class paths are checked (importable, a Head, not abstract); an unknown bare name raises
    ``ConfigError`` listing the registered heads.
    """
    out = list(args)
    for i, arg in enumerate(out):
        key, eq, value = arg.partition("=")
        if key not in (HEAD_KEY, HEAD_KEY + ".help"):
            continue
        if eq:
            prefix, index = key + "=", i
        elif i + 1 < len(out):
            value, prefix, index = out[i + 1], "", i + 1
        else:
            continue
        out[index] = prefix + head_class_path(value)
    return out


def head_class_path(value: str) -> str:
    """A short head name (``untied``), a registered head's class name (``UntiedHead``) or a class path
    (``lmheads.heads.UntiedHead``) as the one checked class path of the class it names
    (``lmheads.heads.untied.UntiedHead``), so that a run records one head under one name however it was
    given; anything else (YAML, a config file) as it is."""
    if any(c in value for c in "{:/"):
        return value
    by_class_name = {cls.__name__: cls for cls in registered_heads().values()}
    cls = by_class_name.get(value) or resolve_head(value)
    return f"{cls.__module__}.{cls.__qualname__}"


PARSER_MODE = "lmheads"


def load_yaml(text: str) -> Any:
    """The parser's YAML loader (jsonargparse's), where a config's ``model.head`` (or its ``class_path``)
    may be a short name, as on the command line: ``head: untied`` becomes the head's class path."""
    value = get_loader("yaml")(text)
    model = value.get("model") if isinstance(value, dict) else None
    head = model.get("head") if isinstance(model, dict) else None
    if isinstance(head, str):
        model["head"] = head_class_path(head)
    elif isinstance(head, dict) and isinstance(head.get("class_path"), str):
        head["class_path"] = head_class_path(head["class_path"])
    return value


def list_heads(modules: list[str] = ()) -> str:
    """The ``heads`` command: every available head, its parameters and what it computes.

    ``modules`` are imported first, so heads defined in a user's own files are listed too; those
    without a short name, and a module that defines no head, are named after the table."""
    imported = []
    for module in modules:
        if module.endswith(".py") or "/" in module or module.startswith("."):
            raise ConfigError(
                f"{module!r} is a file's path, not a module's name: give {Path(module).stem}, run from its "
                "folder or with that folder on PYTHONPATH"
            )
        try:
            imported.append(importlib.import_module(module))
        except (ImportError, ValueError) as err:  # ValueError: an empty name
            raise ConfigError(f"cannot import {module!r} ({err}); is its folder on PYTHONPATH?") from err
    heads = registered_heads()
    unnamed = []
    for module in imported:
        own = [
            cls
            for cls in vars(module).values()
            if isinstance(cls, type) and issubclass(cls, Head) and cls.__module__ == module.__name__
        ]
        unnamed += [
            f"{path}  (no short name: give it by class path, --model.head={path})"
            for path in (f"{cls.__module__}.{cls.__qualname__}" for cls in own if cls not in heads.values())
        ]
        if not own:
            unnamed.append(f"{module.__name__}: defines no head (a subclass of lmheads.heads.Head)")
    rows = [("name", "own parameters", "class", "description")]
    for name, cls in heads.items():
        rows.append((name, cls.formula or "?", f"{cls.__module__}.{cls.__qualname__}", cls.description))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3] for r in rows]
    lines += [f"{name}  (failed to load: {why})" for name, why in broken_heads().items()]
    lines += unnamed
    lines.append("\nV: vocabulary, D: model width, E: embedding width, r: rank, K: mixture components.")
    lines.append("Options of every head: logit_scale, softcap, z_loss, zero_init.")
    lines.append("`python -m lmheads fit --model.head.help NAME` explains a head's options.")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    """``python -m lmheads heads [MODULE ...]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m lmheads heads",
        description="Every available head: its short name, own parameters, class and what it computes.",
    )
    parser.add_argument(
        "modules",
        nargs="*",
        help="modules of your own to import first, whose heads are listed too (my_heads)",
    )
    print(list_heads(parser.parse_args(argv).modules))
