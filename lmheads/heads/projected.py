"""Tied output through a learned projection."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmheads.heads.base import LinearForm, LinearHead


class ProjectedTiedHead(LinearHead):
    """logits = (h P) E^T with a learned P (D -> E).

    With E = D this is Press & Wolf's projected tying (2017, sec. 5); with E < D it is the output side of
    ALBERT's factorized embedding (Lan et al. 2020). P is N(0, 1/D) so that h P keeps the scale of h.
    """

    name = "projected_tied"
    description = "learned projection D->E, then the token embedding: logits = (h P) E^T"
    formula = "D*E"

    def _create_parameters(self) -> None:
        self.proj = nn.Parameter(torch.empty(self.d_embed, self.d_model))  # (E, D), used as h @ P^T
        nn.init.normal_(self.proj, std=self.d_model**-0.5)

    def project(self, h: Tensor, embedding: nn.Embedding) -> LinearForm:
        hidden = nn.functional.linear(h, self.proj)  # (..., E)
        return LinearForm(hidden, embedding.weight, None)  # W: (V, E)
