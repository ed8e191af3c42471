"""Language-model metrics that stay exact across devices and uneven batches.

Validation loss is the mean NLL over *tokens*, not the mean of per-batch means, so a short last batch
and different batch counts per rank weigh correctly; perplexity is its exponential. Sums are kept in
float64 and reduced across processes by torchmetrics. Bits per byte divide by the split's own bytes per
token, measured on its raw text when the data is prepared.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import Metric


class Float64Sums(Metric):
    """A metric whose states are float64 sums, and stay so whatever dtype the model is cast to: torchmetrics
    keeps its states' dtype through ``.half()`` or ``.float()`` but not ``.to(dtype)``, which Lightning's
    ``bf16-true`` and ``16-true`` precisions call, and a bfloat16 sum of NLLs keeps three digits."""

    def _apply(self, fn, exclude_state=""):  # torchmetrics' override of nn.Module's, which moves states
        this = super()._apply(fn, exclude_state)
        for key, default in this._defaults.items():
            this._defaults[key] = default.double()
            setattr(this, key, getattr(this, key).double())
        return this


class TokenNLL(Float64Sums):
    """Accumulates summed NLL and token count; ``compute`` returns ``loss`` (nats per token), ``ppl`` =
    exp(loss) and ``tokens``, the number of tokens it is over."""

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
        return {"loss": loss, "ppl": loss.exp(), "tokens": self.tokens}


def bits_per_byte(loss: float | Tensor, bytes_per_token: float) -> float | Tensor:
    """Bits per UTF-8 byte of text from the mean NLL per token (nats) and the split's bytes per token.

    Total NLL in bits over the text's bytes: independent of the tokenizer, so char, word and subword
    models on the same text compare directly.
    """
    return loss / (math.log(2) * bytes_per_token)


#: Token types ranked by training-set frequency: the most frequent 1%, the next 9%, the rest. The
#: tying papers argue from the rare words (Press & Wolf 2017, sec. 4): this is where heads differ.
FREQUENCY_BUCKETS = ("top1pct", "1to10pct", "rest")
#: How reports name each bucket.
FREQUENCY_BUCKET_LABELS = {"top1pct": "top 1% types", "1to10pct": "next 9%", "rest": "rarest 90%"}

#: Token types by how often they are a target in the training split: the same edges within one
#: vocabulary whatever its size, so that "the tie helps words seen rarely" is tested without changing
#: the vocabulary (and ``<unk>``'s share) between runs.
COUNT_BUCKETS = ("never", "1", "2to4", "5to19", "20to99", "100plus")
COUNT_BUCKET_LABELS = {
    "never": "never in training",
    "1": "seen once",
    "2to4": "seen 2-4 times",
    "5to19": "seen 5-19 times",
    "20to99": "seen 20-99 times",
    "100plus": "seen 100+ times",
}
_COUNT_EDGES = (0, 1, 2, 5, 20, 100)  # each bucket's least count

#: Metrics shown in TensorBoard's HParams tab; every run logs all of them (NaN where not applicable) so
#: that runs line up as columns.
HP_METRICS = ("hp/val_loss", "hp/val_ppl", "hp/val_bpb", "hp/val_excess_loss", "hp/tokens_per_sec")


def bucket_loss_metric(prefix: str, bucket: str) -> str:
    """The logged name of an evaluation's loss on one frequency bucket, e.g. ``val_freq/loss_rest``."""
    return f"{prefix}_freq/loss_{bucket}"


def count_loss_metric(prefix: str, bucket: str) -> str:
    """The logged name of an evaluation's loss on one count bucket, e.g. ``val_count/loss_1``."""
    return f"{prefix}_count/loss_{bucket}"


def count_buckets(counts: np.ndarray) -> Tensor:
    """(V,) count-bucket index of each token id (:data:`COUNT_BUCKETS`), from its training-set count."""
    return torch.from_numpy(np.searchsorted(_COUNT_EDGES, np.asarray(counts), side="right") - 1)


def frequency_buckets(counts: np.ndarray) -> Tensor:
    """(V,) bucket index of each token id, from its training-set count (ties broken by id)."""
    V = len(counts)
    order = np.argsort(-np.asarray(counts), kind="stable")
    n_top = max(1, math.ceil(0.01 * V))
    n_next = max(n_top + 1, math.ceil(0.10 * V))
    bucket = np.full(V, 2, dtype=np.int64)
    bucket[order[:n_top]] = 0
    bucket[order[n_top:n_next]] = 1
    return torch.from_numpy(bucket)


class BucketedNLL(Float64Sums):
    """Token-weighted NLL per frequency bucket of the *target* token; reduced across processes."""

    full_state_update = False

    def __init__(self, n_buckets: int = len(FREQUENCY_BUCKETS)) -> None:
        super().__init__()
        self.add_state("nll_sum", torch.zeros(n_buckets, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros(n_buckets, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, nll: Tensor, bucket: Tensor, mask: Tensor) -> None:
        """nll, bucket, mask: (N,) per-token NLL, bucket index of the target, tokens that count."""
        self.nll_sum.index_add_(0, bucket, nll.double() * mask)
        self.tokens.index_add_(0, bucket, mask.double())

    def compute(self) -> dict[str, Tensor]:
        """``loss`` (K,) mean NLL per bucket (NaN for an empty bucket), ``share`` (K,) of the tokens."""
        loss = torch.where(self.tokens > 0, self.nll_sum / self.tokens.clamp_min(1), math.nan)
        return {"loss": loss, "share": self.tokens / self.tokens.sum().clamp_min(1)}


class SplitNLL(nn.Module):
    """One split's evaluation: token-weighted NLL (:class:`TokenNLL`), and by the target's bucket of
    training frequency and of training count (:class:`BucketedNLL`) where the tables are given."""

    def __init__(self) -> None:
        super().__init__()
        self.nll = TokenNLL()
        self.frequency = BucketedNLL()
        self.count = BucketedNLL(len(COUNT_BUCKETS))

    def update(self, nll: Tensor, targets: Tensor, tables: tuple[Tensor, Tensor] | None) -> None:
        """nll, targets: (N,); tables: (V,) frequency and count bucket of each token id, or ``None``."""
        mask = targets != -100  # lmheads.loss.IGNORE_INDEX
        self.nll.update(nll, mask)
        if tables is not None:
            target = targets.clamp_min(0)
            self.frequency.update(nll, tables[0].to(target.device)[target], mask)
            self.count.update(nll, tables[1].to(target.device)[target], mask)

    def compute(self, bucketed: bool) -> tuple[dict[str, Tensor], dict | None, dict | None]:
        """The overall result and, if ``bucketed``, the two bucket results; then every state reset."""
        result = self.nll.compute()
        buckets = (self.frequency.compute(), self.count.compute()) if bucketed else (None, None)
        for metric in (self.nll, self.frequency, self.count):
            metric.reset()
        return result, *buckets
