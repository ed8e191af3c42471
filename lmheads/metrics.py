"""Language-model metrics that stay exact across devices and uneven batches.

Validation loss is the mean NLL over *tokens*, not the mean of per-batch means, so a short last batch
and different batch counts per rank weigh correctly; perplexity is its exponential. Sums are kept in
float64 and reduced across processes by torchmetrics. Bits per byte divide by the split's own bytes per
token, measured on its raw text when the data is prepared.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric


class TokenNLL(Metric):
    """Accumulates summed NLL and token count; ``compute`` returns ``loss`` (nats per token) and
    ``ppl`` = exp(loss)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nll_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, nll: Tensor, mask: Tensor) -> None:
        """nll: (N,) per-token NLL; mask: (N,) bool, True where the token counts."""
        self.nll_sum += (nll.double() * mask).sum()
        self.tokens += mask.sum()

    def compute(self) -> dict[str, Tensor]:
        loss = self.nll_sum / self.tokens.clamp_min(1)
        return {"loss": loss, "ppl": loss.exp()}


def bits_per_byte(loss: float | Tensor, bytes_per_token: float) -> float | Tensor:
    """Bits per UTF-8 byte of text from the mean NLL per token (nats) and the split's bytes per token.

    Total NLL in bits over the text's bytes: independent of the tokenizer, so char, word and subword
    models on the same text compare directly.
    """
    return loss / (math.log(2) * bytes_per_token)
