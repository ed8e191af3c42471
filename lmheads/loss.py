"""Cross-entropy of a linear head, computed from the head's linear form (h', W, b, soft-cap).

Every head hands the loss the same tensors, so a loss backend is written once and serves all heads.
A backend returns the per-token NLL and the per-token log-partition logsumexp(logits) (for the z-loss).
``naive`` materialises the full (N, V) logits and is the reference the other backends are tested
against.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor

from lmheads.errors import ConfigError
from lmheads.heads.base import LinearForm, apply_softcap

IGNORE_INDEX = -100


class TokenLoss(NamedTuple):
    nll: Tensor  # (N,) -log p(target), 0 where the target is ignored
    lse: Tensor  # (N,) logsumexp of the logits


def naive_linear_cross_entropy(
    form: LinearForm, targets: Tensor, ignore_index: int = IGNORE_INDEX
) -> TokenLoss:
    """Full logits, upcast to fp32, then log-softmax."""
    logits = apply_softcap(F.linear(form.hidden, form.weight, form.bias).float(), form.softcap)  # (N, V)
    lse = logits.logsumexp(dim=-1)  # (N,)
    valid = targets != ignore_index
    target_logit = logits.gather(1, targets.where(valid, 0).unsqueeze(1)).squeeze(1)  # (N,)
    return TokenLoss((lse - target_logit) * valid, lse)


BACKENDS: dict[str, Callable[..., TokenLoss]] = {"naive": naive_linear_cross_entropy}


def get_backend(name: str) -> Callable[..., TokenLoss]:
    if name not in BACKENDS:
        raise ConfigError(f"unknown loss backend {name!r}; available: {', '.join(BACKENDS)}")
    return BACKENDS[name]
