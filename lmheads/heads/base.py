"""The head contract.

Almost every head reduces to one linear form on a (possibly transformed) hidden state:

    logits = transform(h' @ W.T + b)        with   (h', W, b) = head.project(h, embedding)

Such a head is a :class:`LinearHead`; a head that is not (a mixture of softmaxes) is a :class:`Head`
that computes its logits itself, and its loss uses the full logits. For linear heads the logits, the
loss (naive or memory-saving backends), the options every head shares (logit scale, soft-cap, z-loss,
zero initialisation) and parameter accounting are written once, here and in :mod:`lmheads.loss`, and a
new head only says how it forms (h', W, b).

A head never stores a reference to the token embedding: it receives it at every call. That keeps a
tie a tie through meta-device initialisation, FSDP wrapping and checkpoint loading, where aliases made
at construction break.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import sys
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor, nn

from lmheads.dotted import import_class
from lmheads.errors import ConfigError

ENTRY_POINT_GROUP = "lmheads.heads"
_REGISTRY: dict[str, type[Head]] = {}
_BROKEN: dict[str, str] = {}
_ENTRY_POINTS_LOADED = False


class LinearForm(NamedTuple):
    """What a head hands to the loss: logits = cap(hidden @ weight.T + bias).

    ``softcap`` c, when set, maps logits elementwise to c * tanh(logits / c) (Gemma 2).
    """

    hidden: Tensor  # (..., K)
    weight: Tensor  # (V, K)
    bias: Tensor | None  # (V,) or None
    softcap: float | None = None


def apply_softcap(logits: Tensor, softcap: float | None) -> Tensor:
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def at_least_fp32(x: Tensor) -> Tensor:
    """``x`` upcast to fp32 for a softmax, or kept where it is wider (float64, as ``64-true`` trains)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _recording_options(init):
    """Wrap a head's ``__init__`` so that the outermost call records every option by argument name:
    the defaults of each constructor in the class hierarchy, then the arguments given."""

    @functools.wraps(init)
    def recording_init(self, *args, **kwargs) -> None:
        if "_options" not in self.__dict__:
            options: dict[str, Any] = {}
            for cls in reversed(type(self).__mro__):
                if "__init__" in vars(cls) and issubclass(cls, Head):
                    for p in inspect.signature(cls.__init__).parameters.values():
                        if p.default is not p.empty:
                            options[p.name] = p.default
            signature = inspect.signature(init)
            for name, value in list(signature.bind(self, *args, **kwargs).arguments.items())[1:]:  # not self
                if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                    options.update(value)
                else:
                    options[name] = value
            object.__setattr__(self, "_options", options)
        init(self, *args, **kwargs)

    return recording_init


class Head(nn.Module):
    """Base class of all output heads: a head maps hidden states to logits (:meth:`logits`).

    Subclasses set ``name`` (the short name used on the command line), ``description`` and
    ``formula`` (their own parameter count in terms of V, D, E, r) and create their parameters in
    ``_create_parameters``. A head whose logits are a linear form of h subclasses :class:`LinearHead`
    and implements ``project``; any other head implements ``logits``. Defining a subclass with a
    ``name`` of its own registers it.
    A subclass with options of its own takes ``**kwargs`` and passes them to ``super().__init__`` so
    that the options below stay available.

    Construction takes only the head's options, so a head can be written in YAML as
    ``class_path``/``init_args``; the sizes arrive later through :meth:`build`, which the module calls
    once, right after building the backbone (so the backbone's initialisation does not depend on the
    head) and before any strategy wraps the model.

    Args:
        logit_scale: Multiplier on the logits (muP's output multiplier), or ``inv_sqrt_d`` for 1/sqrt(D)
            (OLMo). Applied to h' and b, so the head stays a linear form.
        softcap: Tanh soft-cap c on the logits, c * tanh(logits / c) (Gemma 2, modded-nanogpt);
            ``None`` for none.
        z_loss: Coefficient of the auxiliary z-loss, coefficient * logsumexp(logits)^2 per token
            (PaLM, OLMo; 1e-4 is usual). Reported losses and metrics exclude it.
        zero_init: Start the head's own output matrix at zero (modded-nanogpt); only for heads that
            have one.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    formula: ClassVar[str] = ""
    #: True when ``project`` returns the token embedding (or a function of it) as W.
    shares_embedding: ClassVar[bool] = True
    #: True when the head owns a (V, K) output matrix that ``zero_init`` can start at zero.
    has_output_matrix: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in vars(cls):
            cls.__init__ = _recording_options(cls.__init__)
        if "name" in vars(cls) and cls.name:  # a subclass without a name of its own is used by class path
            other = _REGISTRY.get(cls.name)
            if other is not None and _origin(other) != _origin(cls):
                raise ConfigError(
                    f"head name {cls.name!r} of {cls.__module__}.{cls.__qualname__} is already taken by "
                    f"{other.__module__}.{other.__qualname__}; give the new head another name"
                )
            _REGISTRY[cls.name] = cls

    def __init__(
        self,
        logit_scale: float | Literal["inv_sqrt_d"] = 1.0,
        softcap: float | None = None,
        z_loss: float = 0.0,
        zero_init: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(logit_scale, str) and logit_scale != "inv_sqrt_d":
            self._bad_option("logit_scale", logit_scale, "a positive number or 'inv_sqrt_d'")
        if not isinstance(logit_scale, str) and not logit_scale > 0:
            self._bad_option("logit_scale", logit_scale, "positive")
        if softcap is not None and not softcap > 0:
            self._bad_option("softcap", softcap, "positive, or null for no cap")
        if not z_loss >= 0:
            self._bad_option("z_loss", z_loss, ">= 0")
        if zero_init and not self.has_output_matrix:
            with_matrix = ", ".join(n for n, c in registered_heads().items() if c.has_output_matrix)
            self._bad_option(
                "zero_init", zero_init, f"false: this head has no own output matrix ({with_matrix} do)"
            )
        self.logit_scale = logit_scale
        self.softcap = softcap
        self.z_loss = z_loss
        self.zero_init = zero_init
        self.vocab_size = 0
        self.d_model = 0
        self.d_embed = 0

    def _bad_option(self, option: str, value: Any, expected: str) -> None:
        raise ConfigError(f"head {head_name(self)!r}: {option}={value!r} is invalid; it must be {expected}")

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

    def _init_output_matrix(self, weight: Tensor) -> None:
        """N(0, 0.02) like the embedding, or zeros with ``zero_init``."""
        with torch.no_grad():
            weight.zero_() if self.zero_init else nn.init.normal_(weight, std=0.02)

    @property
    def logit_multiplier(self) -> float:
        """The logit multiplier as a number (needs the head to be built for ``inv_sqrt_d``)."""
        return self.d_model**-0.5 if self.logit_scale == "inv_sqrt_d" else float(self.logit_scale)

    def logits(self, h: Tensor, embedding: nn.Embedding) -> Tensor:
        """Full logits (..., V) for hidden states ``h`` (..., D) and the backbone's token embedding. A
        head that is not a linear form implements this; its loss then uses the full logits."""
        raise NotImplementedError(f"head {head_name(self)!r} implements no logits()")

    def check_contract(self, embedding: nn.Embedding) -> None:
        """Raise a :class:`ConfigError` when this built head's output breaks the contract, on two zero
        hidden states (no gradient, the random state kept): the module checks it before training, so a
        head of one's own that returns the wrong shapes fails at the start with them, not in a step."""
        h = embedding.weight.new_zeros(2, self.d_model)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            problem = self._contract_problem(h, embedding)
        if problem:
            raise ConfigError(f"head {head_name(self)!r} breaks the head contract: {problem}")

    def _contract_problem(self, h: Tensor, embedding: nn.Embedding) -> str:
        """What the head returns for ``h`` (2, D) that the contract does not allow ("" if nothing)."""
        shape, expected = tuple(self.logits(h, embedding).shape), (2, self.vocab_size)
        if shape == expected:
            return ""
        return f"logits(h) for h of shape (2, D) is {shape}, not (2, V) = {expected}"

    def on_train_step(self, step: int, total_steps: int, embedding: nn.Embedding) -> bool:
        """Called before every training step (``total_steps`` is -1 when training has no set length);
        return True when the head changed its parameters in a way that makes their optimizer state stale
        (the module then resets it)."""
        return False

    def parameter_report(self, embedding: nn.Embedding) -> dict[str, int]:
        """``own``: parameters only the head has; ``shared``: embedding parameters it reuses.
        A tensor that is both (a head that registered the embedding) counts as shared only."""
        own = sum(p.numel() for p in self.parameters() if p is not embedding.weight)
        return {"own": own, "shared": embedding.weight.numel() if self.shares_embedding else 0}

    def options(self) -> dict[str, Any]:
        """The head's constructor options, its own and the shared ones, under their argument names: the
        values it was built with, recorded by the outermost constructor (for logging and checkpoints)."""
        return dict(self._options)

    def spec(self) -> dict[str, Any]:
        """``class_path``/``init_args`` that rebuild this head (what a checkpoint stores)."""
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": self.options()}

    def extra_repr(self) -> str:
        return f"V={self.vocab_size}, D={self.d_model}, E={self.d_embed}" if self.built else "unbuilt"


Head.__init__ = _recording_options(Head.__init__)  # subclasses are wrapped in __init_subclass__


class LinearHead(Head):
    """A head whose logits are a linear form of (a transform of) h: it implements :meth:`project`, which
    returns (h', W, b) with logits = h' W^T + b. One loss serves every such head without holding the full
    logits (:mod:`lmheads.loss`)."""

    def project(self, h: Tensor, embedding: nn.Embedding) -> LinearForm:
        """Return (h', W, b) for hidden states ``h`` (..., D) and the backbone's token embedding."""
        raise NotImplementedError(f"linear head {head_name(self)!r} implements no project()")

    def _contract_problem(self, h: Tensor, embedding: nn.Embedding) -> str:
        hidden, weight, bias = self.project(h, embedding)[:3]
        v, k = self.vocab_size, hidden.shape[-1]
        shapes = (tuple(hidden.shape), tuple(weight.shape), None if bias is None else tuple(bias.shape))
        if shapes[0] == (2, k) and shapes[1] == (v, k) and shapes[2] in (None, (v,)):
            return ""
        return (
            f"project(h) for h of shape (2, D) returns h' {shapes[0]}, W {shapes[1]} and b {shapes[2]}; "
            f"they must be (2, K), (V, K) = ({v}, {k}) and (V,) = ({v},) or None"
        )

    def linear_form(self, h: Tensor, embedding: nn.Embedding) -> LinearForm:
        """``project`` with the shared options applied: what the loss backends consume."""
        hidden, weight, bias, _ = self.project(h, embedding)
        scale = self.logit_multiplier
        if scale != 1.0:
            hidden = hidden * scale  # scale (h'W^T + b) = (scale h') W^T + scale b
            bias = bias * scale if bias is not None else None
        return LinearForm(hidden, weight, bias, self.softcap)

    def logits(self, h: Tensor, embedding: nn.Embedding) -> Tensor:
        """Full logits (..., V). Training uses :mod:`lmheads.loss`, which need not materialise them."""
        form = self.linear_form(h, embedding)
        return apply_softcap(
            nn.functional.linear(form.hidden, form.weight, form.bias), form.softcap
        )  # (..., V)


def _origin(cls: type) -> tuple[str, str]:
    """Where a class is defined: its module's file (one file imported under two module names, as a script
    and as a module, defines one head) or else its module's name, and its qualified name."""
    module = sys.modules.get(cls.__module__)
    return getattr(module, "__file__", None) or cls.__module__, cls.__qualname__


def _load_entry_points() -> None:
    """Register heads that installed packages expose in the ``lmheads.heads`` entry-point group.

    A broken entry point does not stop the others; asking for it by name raises its error."""
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        where = f"entry point {ep.name!r} = {ep.value!r} (group {ENTRY_POINT_GROUP})"
        try:
            cls = ep.load()
        except Exception as err:
            _BROKEN[ep.name] = f"{where} failed to import: {type(err).__name__}: {err}"
            continue
        if not (isinstance(cls, type) and issubclass(cls, Head)):
            _BROKEN[ep.name] = f"{where} is not an lmheads.heads.Head subclass"
            continue
        _REGISTRY.setdefault(ep.name, cls)


def registered_heads() -> dict[str, type[Head]]:
    """Short name -> head class: built-in heads, heads defined so far and entry-point heads."""
    _load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def broken_heads() -> dict[str, str]:
    """Entry-point heads that failed to load, with the reason."""
    _load_entry_points()
    return dict(_BROKEN)


def head_class(name: str) -> type[Head]:
    """Look up a head by short name, with a message that lists the alternatives."""
    heads = registered_heads()
    if name in _BROKEN:
        raise ConfigError(f"head {name!r}: {_BROKEN[name]}; fix or uninstall the package that provides it")
    if name not in heads:
        raise ConfigError(
            f"unknown head {name!r}; registered heads: {', '.join(heads)}. "
            "A head of your own can be given as a full class path, e.g. --model.head=mypkg.heads.MyHead"
        )
    return heads[name]


def resolve_head(path: str) -> type[Head]:
    """A head class from a short name or a dotted class path, with a message saying what is wrong."""
    if "." not in path:
        return head_class(path)
    try:
        cls = import_class(path)
    except (ImportError, AttributeError) as err:
        raise ConfigError(
            f"head class {path!r} cannot be imported ({err}); check the class path and that its folder is "
            "on PYTHONPATH or its package is installed"
        ) from err
    if not (isinstance(cls, type) and issubclass(cls, Head)):
        raise ConfigError(f"{path!r} is not a head: a head subclasses lmheads.heads.Head")
    linear = issubclass(cls, LinearHead)
    if (cls.project is LinearHead.project) if linear else (cls.logits is Head.logits):
        raise ConfigError(
            f"head {path!r} does not implement the head contract: a LinearHead defines project(), any "
            "other Head defines logits()"
        )
    return cls


def head_from_spec(spec: dict[str, Any]) -> Head:
    """Build a head from ``{"class_path": ..., "init_args": {...}}`` (or a registered short name)."""
    return resolve_head(spec["class_path"])(**spec.get("init_args", {}))


def head_name(head: Head | type[Head]) -> str:
    """The short name of a head: its class's own ``name`` (not one inherited from a base class), else
    the class name."""
    cls = head if isinstance(head, type) else type(head)
    return vars(cls).get("name") or cls.__name__
