"""Heads that reuse the input embedding E as the output matrix."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmheads.errors import ConfigError
from lmheads.heads.base import LinearForm, LinearHead


def check_square(head: LinearHead) -> None:
    if head.d_embed != head.d_model:
        raise ConfigError(
            f"head {head.name!r} needs d_embed == d_model, got d_embed={head.d_embed}, "
            f"d_model={head.d_model}; use --model.head=projected_tied for a factorized embedding"
        )


class TiedHead(LinearHead):
    """logits = h E^T: the output matrix is the input embedding (Press & Wolf 2017; Inan et al. 2017)."""

    name = "tied"
    description = "output matrix is the token embedding: logits = h E^T"
    formula = "0"

    def _create_parameters(self) -> None:
        check_square(self)

    def project(self, h: Tensor, embedding: nn.Embedding) -> LinearForm:
        return LinearForm(h, embedding.weight, None)  # W: (V, D)


class TiedBiasHead(LinearHead):
    """logits = h E^T + b with a learned per-token bias b, zero-initialised."""

    name = "tied_bias"
    description = "tied plus a learned per-token output bias: logits = h E^T + b"
    formula = "V"

    def _create_parameters(self) -> None:
        check_square(self)
        self.bias = nn.Parameter(torch.zeros(self.vocab_size))  # (V,)

    def project(self, h: Tensor, embedding: nn.Embedding) -> LinearForm:
        return LinearForm(h, embedding.weight, self.bias)
