"""The synthetic language and its exactly known optimum."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from lmheads.data.synthetic import HiddenMarkovLanguage, SyntheticDataModule
from lmheads.errors import ConfigError


@pytest.fixture(scope="module")
def small() -> HiddenMarkovLanguage:
    return HiddenMarkovLanguage.generate(vocab_size=6, n_states=3, noise=0.2, concentration=0.5, seed=3)


def test_deterministic_from_seed():
    a = SyntheticDataModule(vocab_size=64, n_states=4, train_tokens=2048, val_tokens=1024, block_size=16)
    b = SyntheticDataModule(vocab_size=64, n_states=4, train_tokens=2048, val_tokens=1024, block_size=16)
    a.setup("fit")
    b.setup("fit")
    for split in ("train", "validation", "test"):
        assert np.array_equal(a.splits[split].blocks, b.splits[split].blocks)
    assert not np.array_equal(a.splits["train"].blocks[:10], a.splits["validation"].blocks[:10])


def test_stochastic_matrices(small):
    assert np.allclose(small.transition.sum(1), 1) and np.allclose(small.emission.sum(1), 1)
    assert np.allclose(small.initial @ small.transition, small.initial)  # stationary


def _brute_force_conditional_entropy(hmm: HiddenMarkovLanguage, length: int) -> float:
    """Per-token H(X_1..X_{L-1} | X_0) by enumerating every token sequence and every state path,
    with no forward algorithm involved."""
    S, V = hmm.n_states, hmm.vocab_size
    paths = list(itertools.product(range(S), repeat=length))
    joint = np.zeros((V,) * length)
    for seq in itertools.product(range(V), repeat=length):
        total = 0.0
        for path in paths:
            p = hmm.initial[path[0]] * hmm.emission[path[0], seq[0]]
            for t in range(1, length):
                p *= hmm.transition[path[t - 1], path[t]] * hmm.emission[path[t], seq[t]]
            total += p
        joint[seq] = total
    assert np.isclose(joint.sum(), 1.0)
    first = joint.reshape(V, -1).sum(1)
    h_joint = -(joint * np.log(joint)).sum()
    h_first = -(first * np.log(first)).sum()
    return (h_joint - h_first) / (length - 1)


def test_forward_algorithm_matches_enumeration(small):
    length = 4
    seqs = np.array(list(itertools.product(range(6), repeat=length)))
    nll = small.nll(seqs)  # (n, L-1)
    log_p = -nll.sum(1)
    # p(x_1..x_{L-1} | x_0) from the forward algorithm times p(x_0) must be the joint probability.
    p_first = small.initial @ small.emission
    joint = np.exp(log_p) * p_first[seqs[:, 0]]
    assert np.isclose(joint.sum(), 1.0, atol=1e-12)
    expected = (joint * nll.mean(1)).sum()
    assert np.isclose(expected, _brute_force_conditional_entropy(small, length), rtol=1e-10)


def test_sampler_agrees_with_the_model(small):
    """Monte Carlo: the mean optimal NLL of sampled sequences estimates the exact conditional entropy."""
    exact = _brute_force_conditional_entropy(small, 4)
    nll = small.nll(small.sample(40_000, 4, seed=0)).mean(1)
    stderr = nll.std() / np.sqrt(len(nll))
    assert abs(nll.mean() - exact) < 4 * stderr
    # and the token marginal is the stationary one
    tokens = small.sample(40_000, 1, seed=1).ravel()
    freq = np.bincount(tokens, minlength=6) / len(tokens)
    assert np.allclose(freq, small.initial @ small.emission, atol=0.01)


def test_optimum_below_unigram_and_zipf_marginal():
    dm = SyntheticDataModule(train_tokens=64 * 500, val_tokens=64 * 256, block_size=64)
    dm.setup("fit")
    opt = dm.optimal_loss("validation")
    assert 0 < opt < dm.unigram_entropy() < np.log(dm.vocab_size)
    freq = np.bincount(dm.splits["train"].blocks.ravel(), minlength=dm.vocab_size) + 1
    ranks = np.arange(1, dm.vocab_size + 1)
    slope = np.polyfit(np.log(ranks[1:200]), np.log(freq[1:200]), 1)[0]
    assert -1.3 < slope < -0.7  # Zipf with exponent 1


def test_bad_options():
    with pytest.raises(ConfigError, match=r"^data\.n_states=8 must be from 2 to data\.vocab_size=4$"):
        HiddenMarkovLanguage.generate(vocab_size=4, n_states=8)
    with pytest.raises(
        ConfigError,
        match=r"cannot take data\.noise=2 \(give 0 to 1\), data\.zipf_exponent=-1 \(give 0 or more\)$",
    ):
        SyntheticDataModule(noise=2, zipf_exponent=-1)
    dm = SyntheticDataModule(train_tokens=64 * 3, block_size=64, batch_size=4)
    dm.setup("fit")
    with pytest.raises(ConfigError, match=r"fewer than one batch of 4; .* or raise data\.train_tokens$"):
        dm.train_dataloader()
    with pytest.raises(ConfigError, match="less than one block"):
        SyntheticDataModule(val_tokens=10, block_size=64)
    with pytest.raises(ConfigError, match=r"data\.language_seed must be >= 0, got -5"):  # numpy's seeds
        SyntheticDataModule(language_seed=-5)
