"""The embedded default corpus: a synthetic language from a hidden Markov model.

Why an HMM: its tokens follow a Zipf law, they have sequential structure a transformer must learn,
tokens that *predict* alike (emitted by the same hidden state) also *appear* alike (they are followed
by the same states), which is the situation weight tying exploits, and, unlike any natural corpus, the
best achievable loss is known exactly: the generating model's own conditional NLL, computed by the
forward algorithm. Runs on it log the *excess* loss, validation loss minus that optimum.

The language is a deterministic function of its seed and sizes. Transition rows are
Dirichlet(concentration) draws, so the chain is sparse but ergodic. Token ids are Zipf ranks (0 is the
most frequent); tokens are dealt to the hidden states' clusters so that each cluster's Zipf mass tracks
its state's stationary probability, which keeps the token marginal Zipf. State s emits from its
cluster with probability 1 - noise (Zipf weights within the cluster) and from the whole vocabulary with
probability ``noise``, so a token does not reveal its state for certain.

Every sequence (one block of T + 1 tokens) starts from the stationary distribution and is independent
of the others, so a model that sees one block at a time is compared with exactly the Bayes-optimal
predictor for that situation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmheads.data.base import BlockDataset, LMDataModule
from lmheads.errors import ConfigError

_SPLIT_OFFSETS = {"train": 1, "validation": 2, "test": 3}


@dataclass(frozen=True)
class HiddenMarkovLanguage:
    """An HMM over tokens. ``transition`` (S, S) rows sum to 1, ``emission`` (S, V) rows sum to 1,
    ``initial`` (S,) is the stationary distribution of ``transition``."""

    transition: np.ndarray
    emission: np.ndarray
    initial: np.ndarray

    @classmethod
    def generate(
        cls,
        vocab_size: int,
        n_states: int,
        zipf_exponent: float = 1.0,
        noise: float = 0.1,
        concentration: float = 0.1,
        seed: int = 0,
    ) -> HiddenMarkovLanguage:
        if n_states < 2 or vocab_size < n_states:
            raise ConfigError(f"data.n_states={n_states} must be from 2 to data.vocab_size={vocab_size}")
        wrong = [
            f"data.{name}={value} (give {allowed})"
            for name, value, ok, allowed in (
                ("noise", noise, 0.0 <= noise <= 1.0, "0 to 1"),
                ("concentration", concentration, concentration > 0, "more than 0"),
                ("zipf_exponent", zipf_exponent, zipf_exponent >= 0, "0 or more"),
            )
            if not ok
        ]
        if wrong:
            raise ConfigError(f"the synthetic language cannot take {', '.join(wrong)}")
        rng = np.random.default_rng(seed)
        transition = rng.dirichlet(np.full(n_states, concentration), size=n_states)  # (S, S)
        transition = np.maximum(transition, 1e-12)
        transition /= transition.sum(axis=1, keepdims=True)
        evals, evecs = np.linalg.eig(transition.T)
        stationary = np.abs(np.real(evecs[:, np.argmin(np.abs(evals - 1.0))]))
        stationary /= stationary.sum()  # (S,)
        zipf = (np.arange(vocab_size) + 1.0) ** -zipf_exponent  # (V,)
        zipf /= zipf.sum()
        cluster = _assign_clusters(zipf, stationary)  # (V,)
        clusters = np.zeros((n_states, vocab_size))
        clusters[cluster, np.arange(vocab_size)] = zipf
        clusters /= clusters.sum(axis=1, keepdims=True)  # (S, V)
        emission = (1.0 - noise) * clusters + noise * zipf  # (S, V)
        return cls(transition, emission, stationary)

    @property
    def n_states(self) -> int:
        return self.transition.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.emission.shape[1]

    def sample(self, n: int, length: int, seed: int) -> np.ndarray:
        """``n`` independent sequences of ``length`` tokens, (n, length) int32, by inverse-CDF sampling
        (grouped by state, so memory stays O(n))."""
        rng = np.random.default_rng(seed)
        trans_cdf = np.cumsum(self.transition, axis=1)  # (S, S)
        emit_cdf = np.cumsum(self.emission, axis=1)  # (S, V)
        trans_cdf[:, -1] = emit_cdf[:, -1] = 1.0
        out = np.empty((n, length), dtype=np.int32)
        state = np.searchsorted(np.cumsum(self.initial), rng.random(n), side="right").clip(
            max=self.n_states - 1
        )
        for t in range(length):
            if t:
                state = _draw(trans_cdf, state, rng.random(n))
            out[:, t] = _draw(emit_cdf, state, rng.random(n))
        return out

    def nll(self, sequences: np.ndarray) -> np.ndarray:
        """-log p(x_t | x_0..x_{t-1}) for t >= 1 under this HMM, (n, length - 1), by the forward algorithm
        (normalised at every step, float64)."""
        seq = np.asarray(sequences)
        emit_t = self.emission.T  # (V, S)
        alpha = self.initial * emit_t[seq[:, 0]]  # (n, S)
        alpha /= alpha.sum(axis=1, keepdims=True)
        out = np.empty((seq.shape[0], seq.shape[1] - 1))
        for t in range(1, seq.shape[1]):
            alpha = (alpha @ self.transition) * emit_t[seq[:, t]]  # (n, S), joint with x_t
            p = alpha.sum(axis=1)  # (n,) = p(x_t | x_<t)
            out[:, t - 1] = -np.log(p)
            alpha /= p[:, None]
        return out


def _assign_clusters(zipf: np.ndarray, stationary: np.ndarray) -> np.ndarray:
    """Give each token (in rank order) to the state whose cluster mass lags its stationary probability
    most, so that cluster masses track the stationary distribution and the token marginal stays Zipf.
    Every state gets at least one token."""
    n_states = len(stationary)
    cluster = np.empty(len(zipf), dtype=np.int64)
    mass = np.zeros(n_states)
    for v, z in enumerate(zipf):
        cluster[v] = np.argmax(stationary - mass)
        mass[cluster[v]] += z
    sizes = np.bincount(cluster, minlength=n_states)
    for s in np.flatnonzero(sizes == 0):
        donor = np.argmax(sizes)
        cluster[np.flatnonzero(cluster == donor)[-1]] = s
        sizes[donor] -= 1
        sizes[s] += 1
    return cluster


def _draw(cdf: np.ndarray, state: np.ndarray, u: np.ndarray) -> np.ndarray:
    """For each i, the first index k with ``cdf[state[i], k] > u[i]``; ``cdf`` is (S, K)."""
    out = np.empty(len(state), dtype=np.int64)
    for s in np.unique(state):
        rows = state == s
        out[rows] = np.searchsorted(cdf[s], u[rows], side="right")
    return out.clip(max=cdf.shape[1] - 1)


class SyntheticDataModule(LMDataModule):
    """A synthetic language from a seeded hidden Markov model; no files needed.

    Args:
        vocab_size: Vocabulary size V.
        n_states: Hidden states S (token clusters).
        zipf_exponent: Exponent of the Zipf law over token ranks.
        noise: Probability that a state emits from the whole vocabulary instead of its cluster.
        concentration: Dirichlet concentration of the transition rows (smaller: more predictable).
        language_seed: Seed of the language itself; training seeds do not change it.
        train_tokens: Approximate training tokens (rounded to whole blocks).
        val_tokens: Approximate validation (and test) tokens.
        block_size: Context length T; set from the model by the CLI.
        batch_size: Sequences per batch on each device.
        num_workers: DataLoader worker processes.
    """

    more_data = "raise data.train_tokens"

    def __init__(
        self,
        vocab_size: int = 1024,
        n_states: int = 32,
        zipf_exponent: float = 1.0,
        noise: float = 0.1,
        concentration: float = 0.1,
        language_seed: int = 1234,
        train_tokens: int = 2_000_000,
        val_tokens: int = 131_072,
        block_size: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
    ) -> None:
        super().__init__(block_size=block_size, batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters(logger=False)
        if language_seed < 0:  # numpy seeds its generators with non-negative integers only
            raise ConfigError(f"data.language_seed must be >= 0, got {language_seed}")
        for name, value in (("train_tokens", train_tokens), ("val_tokens", val_tokens)):
            if value < block_size:
                raise ConfigError(f"data.{name}={value} is less than one block of {block_size} tokens")
        self.language = HiddenMarkovLanguage.generate(
            vocab_size, n_states, zipf_exponent, noise, concentration, seed=language_seed
        )
        self._optimal: dict[str, np.ndarray] = {}  # per split: the optimal NLL summed over blocks 0..i

    @property
    def vocab_size(self) -> int:
        return self.language.vocab_size

    def _blocks(self, split: str) -> np.ndarray:
        tokens = self.hparams.train_tokens if split == "train" else self.hparams.val_tokens
        n = max(1, tokens // self.block_size)
        seed = self.hparams.language_seed * 10 + _SPLIT_OFFSETS[split]
        return self.language.sample(n, self.block_size + 1, seed=seed)

    def setup(self, stage: str) -> None:
        for split in ("train", "validation", "test"):
            if split not in self.splits:
                self.splits[split] = BlockDataset(self._blocks(split))

    def optimal_loss(self, split: str, tokens: int | None = None) -> float | None:
        """Mean NLL of the generating HMM on the split's targets: no model can do better in expectation.
        With ``tokens``, on the first ``tokens`` targets: an evaluation limited to its first batches scores
        the split's first blocks (one process's, or all processes' in turn: :class:`EvalShard`), and the
        blocks' optima differ, so the whole split's would misstate its excess loss. ``None`` where the
        count is not a whole number of blocks."""
        if split not in self._optimal:
            blocks = self.splits[split].blocks if split in self.splits else self._blocks(split)
            self._optimal[split] = np.cumsum(self.language.nll(blocks).sum(axis=1))
        sums = self._optimal[split]
        n = len(sums) if tokens is None else min(len(sums), tokens // self.block_size)
        if n == 0 or (tokens is not None and n < len(sums) and tokens % self.block_size):
            return None
        return float(sums[n - 1] / (n * self.block_size))

    def unigram_entropy(self) -> float:
        """Entropy (nats) of the stationary token distribution: the loss of the best context-free model."""
        p = self.language.initial @ self.language.emission  # (V,)
        return float(-(p * np.log(p)).sum())
