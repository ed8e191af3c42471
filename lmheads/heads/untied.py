"""A head with its own output matrix."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmheads.heads.base import LinearForm, LinearHead


class UntiedHead(LinearHead):
    """logits = h W^T (+ b) with its own matrix W (V, D), N(0, 0.02) like the embedding (or zero).

    Args:
        bias: Learn a per-token output bias (zero-initialised) as well.
        **kwargs: Options shared by all heads (see :class:`~lmheads.heads.Head`).
    """

    name = "untied"
    description = "own output matrix: logits = h W^T (+ b)"
    formula = "V*D (+V with bias)"
    shares_embedding = False
    has_output_matrix = True

    def __init__(self, bias: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.use_bias = bias

    def _create_parameters(self) -> None:
        self.weight = nn.Parameter(torch.empty(self.vocab_size, self.d_model))  # (V, D)
        self._init_output_matrix(self.weight)
        self.bias = nn.Parameter(torch.zeros(self.vocab_size)) if self.use_bias else None  # (V,)

    def project(self, h: Tensor, embedding: nn.Embedding) -> LinearForm:
        return LinearForm(h, self.weight, self.bias)
