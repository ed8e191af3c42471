"""Cross-entropy of a linear head, computed from the head's (h', W, b) form.

Every head hands the loss the same three tensors, so a loss backend is written once and serves all
heads. ``naive`` materialises the full (N, V) logits and is the reference the other backends are
tested against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

from lmheads.errors import ConfigError
from lmheads.heads.base import LinearForm

IGNORE_INDEX = -100


def naive_linear_cross_entropy(form: LinearForm, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Per-token NLL (N,), zero at ignored positions. Logits are upcast to fp32 before the softmax."""
    logits = F.linear(form.hidden, form.weight, form.bias)  # (N, V)
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="none")  # (N,)


BACKENDS: dict[str, Callable[..., Tensor]] = {"naive": naive_linear_cross_entropy}


def get_backend(name: str) -> Callable[..., Tensor]:
    if name not in BACKENDS:
        raise ConfigError(f"unknown loss backend {name!r}; available: {', '.join(BACKENDS)}")
    return BACKENDS[name]
