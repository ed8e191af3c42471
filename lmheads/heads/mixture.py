"""A head that is not a linear form: the mixture of softmaxes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmheads.heads.base import Head, apply_softcap, at_least_fp32


class MixtureOfSoftmaxesHead(Head):
    """p(v | h) = sum_k pi_k(h) softmax(h_k E^T)_v with h_k = tanh(P_k h) and pi = softmax(Q h).

    Yang et al. (2018, "Breaking the softmax bottleneck") showed that a single softmax over h E^T has
    rank at most D as a log-probability matrix, and that a mixture of K softmaxes lifts that limit; here
    the components share the tied embedding E. The logits it returns are log-probabilities, so the
    log-partition is 0 and a z-loss has nothing to do. Its loss needs the full (N, K, V) component
    logits: every loss backend falls back to them.

    Args:
        components: Number of mixture components K >= 1.
        **kwargs: Options shared by all heads (see :class:`~lmheads.heads.Head`); the logit scale and
            soft-cap apply to each component's logits.
    """

    name = "mos"
    description = "mixture of K softmaxes over the tied embedding (Yang et al. 2018); not a linear form"
    formula = "K*(D*E+E+D+1)"

    def __init__(self, components: int = 4, **kwargs) -> None:
        super().__init__(**kwargs)
        if components < 1:
            self._bad_option("components", components, ">= 1")
        self.components = components

    def _create_parameters(self) -> None:
        k, d, e = self.components, self.d_model, self.d_embed
        self.latent = nn.Linear(d, k * e)  # P: D -> K*E
        self.prior = nn.Linear(d, k)  # Q: D -> K
        for layer in (self.latent, self.prior):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def logits(self, h: Tensor, embedding: nn.Embedding) -> Tensor:
        k, e = self.components, self.d_embed
        latent = torch.tanh(self.latent(h)).unflatten(-1, (k, e)) * self.logit_multiplier  # (..., K, E)
        component = apply_softcap(F.linear(latent, embedding.weight), self.softcap)  # (..., K, V)
        log_prior = at_least_fp32(self.prior(h)).log_softmax(-1).unsqueeze(-1)  # (..., K, 1)
        return torch.logsumexp(log_prior + at_least_fp32(component).log_softmax(-1), dim=-2)  # (..., V)
