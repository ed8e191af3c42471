"""The reference cross-entropy: full logits (N, V), upcast to fp32, then log-softmax. Every other loss is
tested against it; a head that is not a linear form always uses it."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lmheads.heads.base import LinearForm, apply_softcap, at_least_fp32

IGNORE_INDEX = -100


class TokenLoss(NamedTuple):
    nll: Tensor  # (N,) -log p(target), 0 where the target is ignored
    lse: Tensor  # (N,) logsumexp of the logits


class TrainLoss(NamedTuple):
    loss: Tensor  # scalar to differentiate: mean NLL over counted tokens + the z-loss term
    nll: Tensor  # mean NLL, detached (what is logged as the training loss)
    z_loss: Tensor  # z-loss term, detached (0 without a coefficient)


def logits_token_loss(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> TokenLoss:
    """Per-token NLL and log-partition from full logits (N, V), in fp32 (float64 logits stay float64)."""
    logits = at_least_fp32(logits)
    lse = logits.logsumexp(dim=-1)  # (N,)
    valid = targets != ignore_index
    target_logit = logits.gather(1, targets.where(valid, 0).unsqueeze(1)).squeeze(1)  # (N,)
    return TokenLoss((lse - target_logit) * valid, lse)


def naive_linear_cross_entropy(
    form: LinearForm, targets: Tensor, ignore_index: int = IGNORE_INDEX
) -> TokenLoss:
    """Full logits, upcast to fp32, then log-softmax."""
    logits = apply_softcap(
        at_least_fp32(F.linear(form.hidden, form.weight, form.bias)), form.softcap
    )  # (N, V)
    return logits_token_loss(logits, targets, ignore_index)


def reduce_token_loss(
    token: TokenLoss, targets: Tensor, ignore_index: int = IGNORE_INDEX, z_loss: float = 0.0
) -> TrainLoss:
    """Mean NLL over counted tokens plus ``z_loss`` times the mean squared log-partition (PaLM)."""
    valid = targets != ignore_index
    count = valid.sum().clamp_min(1)
    nll = token.nll.sum() / count
    if not z_loss:
        # Not nll + 0: inductor folds the zero away, and the sum, returned beside nll.detach(), then comes
        # out of the compiled graph without a gradient (torch 2.11 and 2.13).
        return TrainLoss(nll, nll.detach(), torch.zeros_like(nll))  # zeros_like carries no gradient
    z = z_loss * (token.lse.square() * valid).sum() / count
    return TrainLoss(nll + z, nll.detach(), z.detach())
