"""The head contract.

Every head reduces to one linear form on a (possibly transformed) hidden state (DESIGN.md):

    logits = h' @ W.T + b        with   (h', W, b) = head.project(h, embedding)

so logits, the loss (naive or memory-saving backends) and parameter accounting are written once,
here and in :mod:`lmheads.loss`, and a new head only says how it forms (h', W, b).

A head never stores a reference to the token embedding: it receives it at every call. That keeps a
tie a tie through meta-device initialisation, FSDP wrapping and checkpoint loading, where aliases made
at construction break.
"""

from __future__ import annotations

import importlib
import inspect
from abc import ABC, abstractmethod
from typing import Any, ClassVar, NamedTuple

from torch import Tensor, nn

from lmheads.errors import ConfigError

_REGISTRY: dict[str, type[Head]] = {}


class LinearForm(NamedTuple):
    """What a head hands to the loss: logits = hidden @ weight.T + bias."""

    hidden: Tensor  # (..., K)
    weight: Tensor  # (V, K)
    bias: Tensor | None  # (V,) or None


class Head(nn.Module, ABC):
    """Base class of all output heads.

    Subclasses set ``name`` (the short name used on the command line), ``description`` and
    ``formula`` (their own parameter count in terms of V, D, E), create their parameters in
    ``_create_parameters`` and implement ``project``. Defining a subclass with a ``name`` registers it.

    Construction takes only the head's options, so a head can be written in YAML as
    ``class_path``/``init_args``; the sizes arrive later through :meth:`build`, which the module calls
    once, right after building the backbone (so the backbone's initialisation does not depend on the
    head) and before any strategy wraps the model.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    formula: ClassVar[str] = ""
    #: True when ``project`` returns the token embedding (or a function of it) as W.
    shares_embedding: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            other = _REGISTRY.get(cls.name)
            if other is not None and other.__qualname__ != cls.__qualname__:
                raise ConfigError(
                    f"head name {cls.name!r} of {cls.__module__}.{cls.__qualname__} is already taken by "
                    f"{other.__module__}.{other.__qualname__}; give the new head another name"
                )
            _REGISTRY[cls.name] = cls

    def __init__(self) -> None:
        super().__init__()
        self.vocab_size = 0
        self.d_model = 0
        self.d_embed = 0

    @property
    def built(self) -> bool:
        return self.vocab_size > 0

    def build(self, vocab_size: int, d_model: int, d_embed: int) -> None:
        """Create the head's own parameters for vocabulary V, model width D and embedding width E."""
        if self.built:
            if (vocab_size, d_model, d_embed) != (self.vocab_size, self.d_model, self.d_embed):
                raise ConfigError(
                    f"head {self.name or type(self).__name__} was built for V={self.vocab_size}, "
                    f"D={self.d_model}, E={self.d_embed}; it cannot be reused for V={vocab_size}, "
                    f"D={d_model}, E={d_embed}"
                )
            return
        self.vocab_size, self.d_model, self.d_embed = vocab_size, d_model, d_embed
        self._create_parameters()

    def _create_parameters(self) -> None:
        """Create and initialise own parameters; sizes are in ``self.vocab_size/d_model/d_embed``."""

    @abstractmethod
    def project(self, h: Tensor, embedding: nn.Embedding) -> LinearForm:
        """Return (h', W, b) for hidden states ``h`` (..., D) and the backbone's token embedding."""

    def logits(self, h: Tensor, embedding: nn.Embedding) -> Tensor:
        """Full logits (..., V). Training uses :mod:`lmheads.loss`, which need not materialise them."""
        hidden, weight, bias = self.project(h, embedding)
        return nn.functional.linear(hidden, weight, bias)  # (..., V)

    def parameter_report(self, embedding: nn.Embedding) -> dict[str, int]:
        """``own``: parameters only the head has; ``shared``: embedding parameters it reuses.
        A tensor that is both (a head that registered the embedding) counts as shared only."""
        own = sum(p.numel() for p in self.parameters() if p is not embedding.weight)
        return {"own": own, "shared": embedding.weight.numel() if self.shares_embedding else 0}

    def options(self) -> dict[str, Any]:
        """The head's constructor options, for logging; heads store each under its argument's name
        or override this."""
        names = inspect.signature(type(self).__init__).parameters
        return {n: getattr(self, n) for n in names if n != "self" and hasattr(self, n)}

    def spec(self) -> dict[str, Any]:
        """``class_path``/``init_args`` that rebuild this head (what a checkpoint stores)."""
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": self.options()}

    def extra_repr(self) -> str:
        return f"V={self.vocab_size}, D={self.d_model}, E={self.d_embed}" if self.built else "unbuilt"


def registered_heads() -> dict[str, type[Head]]:
    """Short name -> head class, for every head defined so far."""
    return dict(sorted(_REGISTRY.items()))


def head_class(name: str) -> type[Head]:
    """Look up a head by short name, with a message that lists the alternatives."""
    heads = registered_heads()
    if name not in heads:
        raise ConfigError(
            f"unknown head {name!r}; registered heads: {', '.join(heads)}. "
            "A head of your own can be given as a full class path, e.g. --model.head=mypkg.heads.MyHead"
        )
    return heads[name]


def head_from_spec(spec: dict[str, Any]) -> Head:
    """Build a head from ``{"class_path": ..., "init_args": {...}}`` (or a registered short name)."""
    path = spec["class_path"]
    if "." not in path:
        cls: type = head_class(path)
    else:
        module, _, name = path.rpartition(".")
        cls = getattr(importlib.import_module(module), name, None)
        if not (isinstance(cls, type) and issubclass(cls, Head)):
            raise ConfigError(f"{path!r} is not an lmheads.heads.Head subclass")
    return cls(**spec.get("init_args", {}))


def head_name(head: Head | type[Head]) -> str:
    """The short name of a head (its class name when it has none)."""
    cls = head if isinstance(head, type) else type(head)
    return cls.name or cls.__name__
