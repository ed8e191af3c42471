"""Dotted names: nested options as one dict with dotted keys (``model.backbone.d_model``), and the class
a dotted class path names (``lmheads.heads.TiedHead`` and ``lmheads.heads.tied.TiedHead`` are one)."""

from __future__ import annotations

import importlib
import json
from typing import Any


def import_class(path: str) -> Any:
    """What a dotted path names (``ImportError``, ``AttributeError`` or ``ValueError`` if nothing)."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def class_of(path: str) -> type | None:
    """The class a dotted path names, or ``None`` where it names none that imports."""
    try:
        cls = import_class(path)
    except (ImportError, AttributeError, ValueError):
        return None
    return cls if isinstance(cls, type) else None


def canonical_class_path(path: str) -> str:
    """The path of the module that defines the class (as given, where it names none)."""
    cls = class_of(path)
    return path if cls is None else f"{cls.__module__}.{cls.__qualname__}"


def flatten(value: Any, prefix: str = "", as_text: bool = False) -> dict[str, Any]:
    """Nested dicts as one dict with dotted keys; tuples become lists, class paths the path of the class
    they import; with ``as_text``, lists and empty dicts become JSON text (hashable, comparable)."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}.", as_text))
        return out
    key = prefix[:-1]
    if isinstance(value, tuple):
        value = list(value)
    if key.endswith("class_path") and isinstance(value, str):
        value = canonical_class_path(value)
    if as_text and isinstance(value, list | dict):
        value = json.dumps(value)
    return {key: value}
