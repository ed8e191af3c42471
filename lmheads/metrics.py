"""Language-model metrics that stay exact across devices and uneven batches.

Validation loss is the mean NLL over *tokens*, not the mean of per-batch means, so a short last batch
and different batch counts per rank weigh correctly; perplexity is its exponential. Sums are kept in
float64 and reduced across processes by torchmetrics.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric


class TokenNLL(Metric):
    """Accumulates summed NLL, token count and (optionally) the UTF-8 bytes those tokens stand for.

    ``compute`` returns ``loss`` (nats/token), ``ppl`` = exp(loss) and ``bpb`` = total NLL / (ln 2 *
    total bytes), NaN where no byte counts were given (synthetic data has no bytes).
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nll_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("bytes", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, nll: Tensor, mask: Tensor, n_bytes: Tensor | None = None) -> None:
        """nll: (N,) per-token NLL; mask: (N,) bool, True where the token counts; n_bytes: (N,) or None."""
        self.nll_sum += (nll.double() * mask).sum()
        self.tokens += mask.sum()
        if n_bytes is not None:
            self.bytes += (n_bytes.double() * mask).sum()

    def compute(self) -> dict[str, Tensor]:
        loss = self.nll_sum / self.tokens.clamp_min(1)
        bpb = self.nll_sum / (math.log(2) * self.bytes) if self.bytes > 0 else torch.full_like(loss, math.nan)
        return {"loss": loss, "ppl": loss.exp(), "bpb": bpb}
