"""What every lmheads data module provides, and the block dataset they share."""

from __future__ import annotations

import hashlib
import itertools
import os
import warnings
from collections.abc import Callable

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lmheads.errors import ConfigError
from lmheads.lightning_internals import batches_done_this_epoch
from lmheads.loss import IGNORE_INDEX


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes: what a data file said, wherever it lies."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _seed() -> int:
    """The run's seed (set by ``seed_everything``), for data-order generators."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class ResumableSampler(DistributedSampler):
    """The distributed sampler (one shard per process, a permutation per epoch from seed + epoch) that can
    start part-way into an epoch, so a run resumed mid-epoch sees exactly the batches it had left.

    With one process it is simply a seeded per-epoch shuffle. The tail that does not divide evenly
    among processes is dropped, never padded with duplicates.

    With ``random_offsets`` (a :class:`StreamBlocks` dataset) every epoch cuts the token stream into
    blocks starting at its own offset in [0, T), drawn from seed and epoch alone (so the same on every
    process and after a resume), and yields ``(offset, i)`` pairs: epochs see different windows of the
    text, and within an epoch every token is still a target at most once.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int,
        rank: int,
        shuffle: bool,
        seed: int,
        random_offsets: bool = False,
    ):
        if random_offsets and not isinstance(dataset, StreamBlocks):
            raise ConfigError("random offsets need blocks cut from a token stream (text data)")
        self.block_size = dataset.block_size if random_offsets else None
        blocks = range(dataset.blocks_at_any_offset()) if random_offsets else dataset
        super().__init__(
            blocks, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True
        )
        self.start = 0  # samples of this rank's epoch already trained on
        # Where a resumed run stands, read when iteration begins: Lightning builds the loader before it
        # restores its progress when it sizes an epoch-based schedule (estimated_stepping_batches).
        self.resume_at: Callable[[], int] | None = None

    def offset(self) -> int:
        """This epoch's first window start (0 without random offsets)."""
        if self.block_size is None:
            return 0
        return int(np.random.default_rng([self.seed, self.epoch]).integers(self.block_size))

    def __iter__(self):
        if self.resume_at is not None:
            self.start, self.resume_at = min(self.resume_at(), self.num_samples), None
        indices = itertools.islice(super().__iter__(), self.start, None)
        if self.block_size is None:
            return indices
        offset = self.offset()
        return ((offset, i) for i in indices)

    def __len__(self) -> int:
        # The whole epoch's length, also when resuming part-way: Lightning sizes every epoch from the
        # length it reads once, and counts the resumed epoch's batches from the restored progress.
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0  # a new epoch starts at its beginning
        super().set_epoch(epoch)


class BlockDataset(Dataset):
    """Rows of a (n, T + 1) token array as (input, target) pairs: x = row[:-1], y = row[1:].

    The array may be a strided view of a memory-mapped token stream (see :func:`stream_blocks`), so
    nothing is copied until a batch is built.
    """

    def __init__(self, blocks: np.ndarray) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return _pair(self.blocks[i])


class EvalShard(Dataset):
    """One process's share of an evaluation split: blocks ``rank``, ``rank + W``, ``rank + 2W``, ... of W
    processes, so that together they evaluate every block exactly once, as one process does.

    Where the blocks do not divide evenly, the processes one block short end with a padding block whose
    targets are all ``IGNORE_INDEX``: every process runs the same batches (a sharded model gathers its
    parameters in every forward, on every process), and the padding adds no token to any metric.
    (A ``DistributedSampler`` would pad with duplicate blocks, counted twice, or drop the tail.)
    """

    def __init__(self, dataset: Dataset, world_size: int, rank: int) -> None:
        self.dataset, self.world_size, self.rank = dataset, world_size, rank

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.world_size)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        index = self.rank + i * self.world_size
        if index < len(self.dataset):
            return self.dataset[index]
        inputs, targets = self.dataset[0]
        return inputs, torch.full_like(targets, IGNORE_INDEX)


def _pair(window: np.ndarray) -> tuple[Tensor, Tensor]:
    row = torch.from_numpy(np.array(window, dtype=np.int64))  # (T + 1,), a copy of the (mapped) stream
    return row[:-1], row[1:]


def stream_blocks(stream: np.ndarray, block_size: int, split: str) -> np.ndarray:
    """View a flat token stream as overlapping windows of T + 1 tokens with stride T.

    Consecutive windows share one token, so every token after the first is a target exactly once.
    """
    return _windows(stream, block_size, split)[::block_size]


def _windows(stream: np.ndarray, block_size: int, split: str) -> np.ndarray:
    """Every window of T + 1 tokens of the stream, stride 1: (L - T, T + 1), a view."""
    if len(stream) < block_size + 1:
        raise ConfigError(
            f"the {split} split has {len(stream)} tokens, fewer than block_size + 1 = {block_size + 1}; "
            "lower --model.backbone.block_size or provide more text"
        )
    return np.lib.stride_tricks.sliding_window_view(stream, block_size + 1)


class StreamBlocks(BlockDataset):
    """The blocks of a token stream (:func:`stream_blocks`), which can also be cut at another offset:
    item ``i`` is block i at offset 0, item ``(offset, i)`` the window starting at ``offset + i * T``."""

    def __init__(self, stream: np.ndarray, block_size: int, split: str) -> None:
        self.windows = _windows(stream, block_size, split)
        self.block_size = block_size
        super().__init__(self.windows[::block_size])

    def blocks_at_any_offset(self) -> int:
        """Blocks that fit whatever the offset in [0, T): one fewer than at offset 0 where the stream's
        tail is short."""
        return (len(self.windows) - self.block_size) // self.block_size + 1

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, Tensor]:
        if isinstance(key, tuple):
            offset, i = key
            return _pair(self.windows[offset + i * self.block_size])
        return super().__getitem__(key)


class LMDataModule(L.LightningDataModule):
    """Base class of lmheads data modules.

    Subclasses know ``vocab_size`` right after ``__init__`` (the CLI passes it to the model then),
    build ``self.splits`` (split name -> :class:`BlockDataset`) in ``setup``, and may fill
    ``bytes_per_token`` (split -> UTF-8 bytes of raw text per token, for bits per byte) and override
    :meth:`optimal_loss`.

    Args:
        block_size: Context length T; set from ``model.backbone.block_size`` by the CLI.
        batch_size: Sequences per batch on each device.
        num_workers: DataLoader worker processes.
    """

    #: How a user gives a split more blocks, for the line that refuses one with too few.
    more_data = "add text"

    def __init__(self, block_size: int = 128, batch_size: int = 32, num_workers: int = 0) -> None:
        super().__init__()
        if block_size <= 0:
            raise ConfigError(
                f"data.block_size (the CLI's model.backbone.block_size) must be positive, got {block_size}"
            )
        if batch_size <= 0:
            raise ConfigError(f"data.batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}")
        self.block_size = block_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.random_offsets = False  # data cut from a token stream may set it (TextDataModule)
        self.splits: dict[str, BlockDataset] = {}
        # data option -> file_digest of the file it named, when read; <split>_text -> a dataset's text
        self.sources: dict[str, str] = {}
        self.bytes_per_token: dict[str, float] = {}
        self._train_counts: np.ndarray | None = None

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the data: the digests of the files read, by which a resume tells
        whether it reads the same data (:func:`lmheads.run.resume.data_conflicts`), and of a dataset's text
        (``TextDataModule.load_state_dict``)."""
        return {"sources": dict(self.sources)}

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def train_token_counts(self) -> np.ndarray:
        """(V,) how often each token id is a training target (every token after the first).

        Counted once, a chunk of blocks at a time (the training set may be a large memory map), then
        kept; subclasses may also keep it on disk (:meth:`_count_train_tokens`)."""
        if self._train_counts is None:
            self._train_counts = self._count_train_tokens()
        return self._train_counts

    def _count_train_tokens(self) -> np.ndarray:
        blocks = self.splits["train"].blocks
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        for start in range(0, len(blocks), 8192):
            chunk = np.asarray(blocks[start : start + 8192, 1:])
            counts += np.bincount(chunk.ravel(), minlength=self.vocab_size)
        return counts

    def optimal_loss(self, split: str, tokens: int | None = None) -> float | None:
        """The lowest achievable mean NLL on a split, where it is known exactly; else None. ``tokens``:
        on the split's first ``tokens`` targets only, the ones an evaluation limited to its first batches
        (``trainer.limit_val_batches``) scored."""
        return None

    def decode(self, ids) -> str:
        """Text of token ids (data without text shows the ids)."""
        return " ".join(str(int(i)) for i in ids)

    def _train_sampler(self, dataset: Dataset) -> ResumableSampler:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ResumableSampler(
            dataset, world, rank, shuffle=True, seed=_seed(), random_offsets=self.random_offsets
        )
        if trainer is not None:
            # Resumed mid-epoch: skip what this epoch already trained on, as Lightning's restored progress
            # says when the epoch's iteration begins.
            sampler.set_epoch(trainer.current_epoch)
            sampler.resume_at = lambda: batches_done_this_epoch(trainer) * self.batch_size
            # Lightning cannot see that this loader resumes part-way, and would warn that it does not.
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")
        return sampler

    def _loader(self, split: str, train: bool) -> DataLoader:
        if split not in self.splits:
            raise ConfigError(
                f"the data has no {split} split: with text files give data.{split}_file, or a dataset "
                f"(data.dataset_name) that has one"
            )
        dataset = self.splits[split]
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        blocks = dataset.blocks_at_any_offset() if train and self.random_offsets else len(dataset)
        if train and blocks < self.batch_size * world:  # each process's last short batch is dropped
            where = " at every offset (data.random_offsets)" if self.random_offsets else ""
            each = f" on each of {world} processes" if world > 1 else ""
            raise ConfigError(
                f"the {split} split has {blocks} blocks of {self.block_size} tokens{where}, fewer than one "
                f"batch of {self.batch_size}{each}; lower data.batch_size or model.backbone.block_size, or "
                f"{self.more_data}"
            )
        sampler = None
        if train:
            sampler = self._train_sampler(dataset)
        elif trainer is not None and trainer.world_size > 1:
            dataset = EvalShard(dataset, trainer.world_size, trainer.global_rank)
            # the shard in order; Lightning leaves a DistributedSampler as it is (it would shard again)
            sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            # Worker seeds come from this generator, not the global one, which stays the model's alone
            # (so building loaders on resume does not shift dropout's random stream).
            generator=torch.Generator().manual_seed(_seed()),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test" if "test" in self.splits else "validation", train=False)
