"""A head that lives outside lmheads, as a user's would: the contract tests cover it by registration alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmheads.heads import LinearForm, LinearHead, UntiedHead


class CosineTiedHead(LinearHead):
    """logits = tau * cos(h, E_v): tied, on the unit sphere, with a learned temperature tau.

    Args:
        tau: Initial temperature.
        **kwargs: Options shared by all heads.
    """

    name = "test_cosine_tied"
    description = "tied on the unit sphere: logits = tau cos(h, E_v)"
    formula = "1"

    def __init__(self, tau: float = 10.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.tau = tau

    def _create_parameters(self) -> None:
        self.log_tau = nn.Parameter(torch.tensor(float(self.tau)).log())

    def project(self, h, embedding):
        hidden = self.log_tau.exp() * F.normalize(h, dim=-1)  # (..., D)
        return LinearForm(hidden, F.normalize(embedding.weight, dim=-1), None)


class SmallInitUntied(UntiedHead):
    """A built-in head with one change and no short name of its own: used by class path."""

    def _create_parameters(self) -> None:
        super()._create_parameters()
        with torch.no_grad():
            self.weight.mul_(0.1)


class NamedUntied(UntiedHead):
    """A built-in head subclassed under a short name of its own."""

    name = "test_named_untied"
    description = "untied, under another name"
