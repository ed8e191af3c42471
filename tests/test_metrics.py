from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from lmheads.metrics import SplitNLL, TokenNLL, bits_per_byte


def test_token_weighted_not_batch_weighted():
    metric = TokenNLL()
    full = torch.full((100,), 2.0)
    short = torch.full((10,), 5.0)  # a short last batch with a much higher loss
    metric.update(full, torch.ones(100, dtype=torch.bool))
    metric.update(short, torch.ones(10, dtype=torch.bool))
    out = metric.compute()
    expected = (100 * 2.0 + 10 * 5.0) / 110
    assert math.isclose(out["loss"].item(), expected, rel_tol=1e-12)
    assert math.isclose(out["ppl"].item(), math.exp(expected), rel_tol=1e-12)


def test_mask():
    metric = TokenNLL()
    metric.update(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([True, True, False, True]))
    assert math.isclose(metric.compute()["loss"].item(), 7.0 / 3, rel_tol=1e-12)


def test_bits_per_byte():
    # 2 nats per token at 4 bytes per token: 2 / ln 2 bits per token, a quarter of that per byte.
    assert math.isclose(bits_per_byte(2.0, 4.0), 2.0 / math.log(2) / 4.0)


def test_count_buckets_by_how_often_a_type_occurs_in_training():
    from lmheads.metrics import COUNT_BUCKETS, count_buckets

    counts = np.array([0, 1, 2, 4, 5, 19, 20, 99, 100, 5000])
    names = [COUNT_BUCKETS[i] for i in count_buckets(counts).tolist()]
    assert names == ["never", "1", "2to4", "2to4", "5to19", "5to19", "20to99", "20to99", "100plus", "100plus"]


def test_sums_stay_float64_when_the_model_is_cast():
    """Lightning's bf16-true calls .to(torch.bfloat16) on the model; a bfloat16 sum of 10,000 NLLs near 6
    would be off by hundreds (and the bucket sums would refuse float64 updates)."""
    metric = nn.ModuleDict({"val": SplitNLL()}).to(torch.bfloat16)["val"]
    nll = torch.full((10_000,), 6.01)
    targets = torch.arange(10_000) % 4
    metric.update(nll, targets, (torch.tensor([0, 1, 2, 2]), torch.tensor([5, 4, 3, 0])))
    assert abs(metric.nll.compute()["loss"].item() - 6.01) < 1e-6
    torch.testing.assert_close(
        metric.frequency.compute()["loss"][:2], torch.full((2,), 6.01, dtype=torch.float64)
    )
