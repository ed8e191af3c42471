"""Text corpora through HF ``datasets``: local text files or a hub dataset, tokenized once and cached.

Pipeline, identical on every process so that only the first one does the work:

1. ``__init__`` loads the raw splits (``datasets`` caches them as Arrow) and trains or loads the
   tokenizer, cached as JSON under ``cache_dir`` and keyed by the training split's fingerprint and the
   tokenizer options. The vocabulary size is therefore known before the model is built.
2. ``prepare_data`` (one process per node) tokenizes each split with ``Dataset.map`` and writes the
   concatenated token stream to ``cache_dir/streams/<key>.npy`` with the split's token and UTF-8 byte
   counts beside it (``<key>.json``); a later run finds the files and does not tokenize again.
3. ``setup`` (every process) memory-maps the streams and views them as blocks of T + 1 tokens; under DDP
   Lightning's distributed sampler gives each rank its own shard of the training blocks.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Literal

import numpy as np
from lightning.pytorch.utilities import rank_zero_info

from lmheads.data.base import LMDataModule, StreamBlocks
from lmheads.data.cache import atomic_write, cache_writes, default_cache_dir, digest, writable
from lmheads.data.sources import VAL_FRACTION, load_splits
from lmheads.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    PretrainedTokenizer,
    Tokenizer,
    WordTokenizer,
)
from lmheads.errors import ConfigError

_STREAM_FORMAT = 3  # bump when the stream layout changes, to invalidate old cache files
#: Options that only one tokenizer reads, and that tokenizer.
_TOKENIZER_OPTIONS = {
    "min_count": "word",
    "max_vocab": "word",
    "bpe_vocab_size": "bpe",
    "tokenizer_path": "pretrained",
}

#: The options of one source of text, which the other does not read.
_SOURCE_OPTIONS = {
    "validation_file": "train_file",
    "test_file": "train_file",
    "dataset_config": "dataset_name",
    "text_column": "dataset_name",
}


def encode_batch(batch: dict[str, list], tokenizer: Tokenizer, text_column: str) -> dict[str, list]:
    """``Dataset.map`` function (module level, so its fingerprint is stable and the cache is reused)."""
    return {"ids": tokenizer.encode_batch(batch[text_column])}


class TextDataModule(LMDataModule):
    """Language modelling on text: local files or a hub dataset.

    Give either ``train_file`` (plus optional ``validation_file``/``test_file``) or ``dataset_name``.
    Without a validation split, the last ``val_fraction`` of the training records is held out.

    Args:
        train_file: Path of a UTF-8 text file for training.
        validation_file: Optional validation text file.
        test_file: Optional test text file.
        dataset_name: A ``datasets`` hub name or local dataset directory, e.g. ``Salesforce/wikitext``.
        dataset_config: The hub dataset's configuration name, e.g. ``wikitext-2-v1``.
        text_column: Column holding the text in a hub dataset.
        tokenizer: ``char`` (characters of the training text), ``byte`` (UTF-8 bytes), ``word``
            (whitespace words, one ``<eos>`` per line: the WikiText convention), ``bpe`` (byte-level
            BPE trained on the training text, one ``<eos>`` per line) or ``pretrained`` (the
            ``tokenizer.json`` of a model's folder, ``tokenizer_path``: for ``model.init_from``).
        min_count: ``word`` only: keep words seen at least this often in training.
        max_vocab: ``word`` only: cap on the vocabulary size, specials included.
        bpe_vocab_size: ``bpe`` only: vocabulary size (256 bytes, ``<eos>`` and the learned merges).
        tokenizer_path: ``pretrained`` only: a local folder with a ``tokenizer.json`` (an HF model's).
        val_fraction: Fraction of training records held out when there is no validation split.
        cache_dir: Where tokenizers and token streams are cached (default ``$LMHEADS_CACHE`` or
            ``~/.cache/lmheads``).
        num_proc: Processes for tokenization (default: one per CPU core, at most 8; 0: tokenize in
            this process).
        block_size: Context length T; set from the model by the CLI.
        batch_size: Sequences per batch on each device.
        num_workers: DataLoader worker processes.
        random_offsets: Training only: each epoch cuts the text into blocks from its own random offset
            in [0, T) (drawn from the seed and the epoch, so resumable), so that later epochs do not
            repeat the same windows; nanoGPT draws random windows for the same reason. Off: every epoch
            reshuffles the same blocks.
    """

    def __init__(
        self,
        train_file: str | None = None,
        validation_file: str | None = None,
        test_file: str | None = None,
        dataset_name: str | None = None,
        dataset_config: str | None = None,
        text_column: str = "text",
        tokenizer: Literal["char", "byte", "word", "bpe", "pretrained"] = "char",
        min_count: int = 1,
        max_vocab: int | None = None,
        bpe_vocab_size: int = 8192,
        tokenizer_path: str | None = None,
        val_fraction: float = VAL_FRACTION,
        cache_dir: str | None = None,
        num_proc: int | None = None,
        block_size: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        random_offsets: bool = False,
    ) -> None:
        super().__init__(block_size=block_size, batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters(logger=False)
        self.random_offsets = random_offsets
        if (train_file is None) == (dataset_name is None):
            raise ConfigError("give exactly one of data.train_file (local text) or data.dataset_name (hub)")
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        defaults = inspect.signature(TextDataModule.__init__).parameters
        for option, source in _SOURCE_OPTIONS.items():
            # a test file beside a hub dataset would be recorded with the run, and its test not on it
            given, other = self.hparams[option], "dataset_name" if source == "train_file" else "train_file"
            if self.hparams[source] is None and given != defaults[option].default:
                raise ConfigError(
                    f"data.{option}={given!r} is read with data.{source} only, and this run reads "
                    f"data.{other}={self.hparams[other]!r}: remove data.{option}, or give data.{source} "
                    f"instead of data.{other}"
                )
        for option, reader in _TOKENIZER_OPTIONS.items():
            # another tokenizer's option would be recorded with the run and change nothing
            neutral = defaults[option].default
            if tokenizer != reader and (value := self.hparams[option]) != neutral:
                raise ConfigError(
                    f"data.{option}={value} is read by data.tokenizer={reader} only, and this run's "
                    f"tokenizer is {tokenizer}: remove data.{option} (or set it to {neutral}), or set "
                    f"data.tokenizer={reader}"
                )
        if num_proc is not None and num_proc < 0:
            raise ConfigError(f"data.num_proc must be >= 0 (0: tokenize in this process), got {num_proc}")
        self.cache_dir = writable(Path(cache_dir) if cache_dir else default_cache_dir())
        self.num_proc = min(8, os.cpu_count() or 1) if num_proc is None else num_proc
        with _plain_progress(), cache_writes(self.cache_dir):
            self.raw, self.text_column = load_splits(self.hparams, self.cache_dir, self.sources)
        self.tokenizer = self._load_or_train_tokenizer()
        self.unknown: dict[str, float] = {}  # split -> share of its tokens that are <unk>
        self.other_text: list[str] = []  # how an evaluated split differs from the checkpoint's run's
        self._noted = False

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _train_texts(self):
        for batch in self.raw["train"].iter(batch_size=10_000):
            yield from batch[self.text_column]

    def _load_or_train_tokenizer(self) -> Tokenizer:
        hp = self.hparams
        options = {"kind": hp.tokenizer, "min_count": hp.min_count, "max_vocab": hp.max_vocab}
        if hp.tokenizer == "bpe":
            options["bpe_vocab_size"] = hp.bpe_vocab_size
        if hp.tokenizer == "pretrained":  # read from its folder every time: the folder's file decides
            if hp.tokenizer_path is None:
                raise ConfigError("data.tokenizer=pretrained needs data.tokenizer_path, a model's folder")
            return PretrainedTokenizer.from_folder(hp.tokenizer_path)
        key = digest({"train": self.raw["train"]._fingerprint, **options})
        path = self.cache_dir / "tokenizers" / f"{key}.json"
        if path.is_file():
            return Tokenizer.from_dict(json.loads(path.read_text()))
        if hp.tokenizer == "char":
            tokenizer: Tokenizer = CharTokenizer.train(self._train_texts())
        elif hp.tokenizer == "byte":
            tokenizer = ByteTokenizer()
        elif hp.tokenizer == "bpe":
            tokenizer = BPETokenizer.train(self._train_texts(), vocab_size=hp.bpe_vocab_size)
        else:
            tokenizer = WordTokenizer.train(
                self._train_texts(), min_count=hp.min_count, max_size=hp.max_vocab
            )
        if tokenizer.vocab_size < 2:
            raise ConfigError("the training text yields fewer than 2 tokens; give more text")
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(tokenizer.to_dict())))
        return tokenizer

    def stream_path(self, split: str) -> Path:
        key = digest(
            {
                "data": self.raw[split]._fingerprint,
                "tokenizer": self.tokenizer.fingerprint(),
                "column": self.text_column,
                "format": _STREAM_FORMAT,
            }
        )
        return self.cache_dir / "streams" / f"{key}.npy"

    def prepare_data(self) -> None:
        with _plain_progress():
            self._prepare_data()

    def _prepare_data(self) -> None:
        import datasets

        hp = self.hparams
        for split in self.raw:
            path = self.stream_path(split)
            if path.is_file() and path.with_suffix(".json").is_file():
                continue
            if not datasets.is_progress_bar_enabled():
                rank_zero_info(
                    f"data: tokenizing {split} ({len(self.raw[split]):,} records), once for later runs"
                )
            with cache_writes(self.cache_dir):
                ids = self.raw[split].map(
                    encode_batch,
                    batched=True,
                    fn_kwargs={"tokenizer": self.tokenizer, "text_column": self.text_column},
                    remove_columns=self.raw[split].column_names,
                    # BPE encodes batches in parallel itself; Python tokenizers use processes
                    num_proc=(self.num_proc or None)
                    if len(self.raw[split]) >= 10_000 and hp.tokenizer != "bpe"
                    else None,
                    desc=f"tokenizing {split}",
                )
            dtype = np.uint16 if self.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
            chunks = [
                np.asarray(row, dtype=dtype) for batch in ids.iter(batch_size=10_000) for row in batch["ids"]
            ]
            stream = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
            n_bytes, text_hash = 0, hashlib.sha256()  # the split's text, record by record
            for batch in self.raw[split].iter(batch_size=10_000):
                for text in batch[self.text_column]:
                    data = text.encode("utf-8")
                    n_bytes += len(data)
                    text_hash.update(len(data).to_bytes(8, "little") + data)
            atomic_write(path, lambda tmp, stream=stream: np.save(tmp, stream))
            unk = self.tokenizer.unk_id
            counts = {
                "tokens": len(stream),
                "bytes": n_bytes,
                "unknown": int(np.sum(stream == unk)) if unk is not None else 0,
                "sha256": text_hash.hexdigest(),
            }
            atomic_write(
                path.with_suffix(".json"), lambda tmp, counts=counts: tmp.write_text(json.dumps(counts))
            )

    def setup(self, stage: str) -> None:
        for split in self.raw:
            if split in self.splits:
                continue
            path = self.stream_path(split)
            if not path.with_suffix(".json").is_file():  # prepare_data did not run (direct use)
                self.prepare_data()
            stream = np.load(path, mmap_mode="r")
            counts = json.loads(path.with_suffix(".json").read_text())
            self.bytes_per_token[split] = counts["bytes"] / max(1, counts["tokens"])
            self.unknown[split] = counts["unknown"] / max(1, counts["tokens"])
            if self.hparams.dataset_name is not None:  # files have their own digests
                self.sources[f"{split}_text"] = counts["sha256"]
            self.splits[split] = StreamBlocks(stream, self.block_size, split)
        if not self._noted and (note := self.unknown_note()):
            rank_zero_info(note)
            self._noted = True

    def load_state_dict(self, state: dict) -> None:
        """A hub dataset, or a local dataset folder, can hold other text under the same name, which its
        options do not show. A fit continued from a checkpoint on other text is refused; a validation or
        test of other text is said to be of other data (:attr:`other_text`)."""
        fn = self.trainer.state.fn if self.trainer is not None else None
        splits = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",)}.get(fn, ())
        theirs = state.get("sources") or {}
        changed = [
            split
            for split in splits
            if f"{split}_text" in theirs and theirs[f"{split}_text"] != self.sources.get(f"{split}_text")
        ]
        name = self.hparams.dataset_name
        if changed and fn == "fit":
            raise ConfigError(
                f"data.dataset_name {name!r} holds other {' and '.join(changed)} text than when the "
                "checkpoint's run read it: continuing would train that run on other data. Give the data it "
                "trained on, or train a new run without --ckpt_path"
            )
        self.other_text = [
            f"data.dataset_name {name!r}: other {split} text than when the checkpoint's run read it"
            for split in changed
        ]

    def unknown_note(self) -> str | None:
        """A line when evaluation text holds tokens outside the vocabulary (``<unk>``) that the training
        text never holds: no model can learn to predict them, so they raise every evaluation loss."""
        if self.unknown.get("train", 1) > 0:
            return None
        shares = [
            f"{self.unknown[s]:.2%} of the {s} tokens" for s in ("validation", "test") if self.unknown.get(s)
        ]
        if not shares:
            return None
        fix = (
            "Set data.min_count=2 (or more) to map the training text's rarest words to <unk> too, so that it "
            "is learned"
            if self.hparams.tokenizer == "word"
            else "Use data.tokenizer=byte, which has no unknown tokens"
        )
        return (
            f"data: {' and '.join(shares)} are outside the training vocabulary (<unk>), which the training "
            f"text never holds: no model learns to predict them, and they raise the evaluation loss. {fix}"
        )

    def _count_train_tokens(self) -> np.ndarray:
        """Counted once per token stream and block size, and kept beside the stream."""
        path = self.stream_path("train").with_suffix(f".counts-T{self.block_size}.npy")
        if path.is_file():
            return np.load(path)
        counts = super()._count_train_tokens()
        atomic_write(path, lambda tmp: np.save(tmp, counts))
        return counts

    def decode(self, ids) -> str:
        return self.tokenizer.decode(int(i) for i in ids)


@contextlib.contextmanager
def _plain_progress():
    """Where the output is not a terminal (a log file, a pipe), the datasets library's progress bars off
    while lmheads loads and tokenizes text (as lmheads' own progress is lines there), and back after."""
    import datasets

    turn_off = datasets.is_progress_bar_enabled() and not sys.stderr.isatty()
    if turn_off:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if turn_off:
            datasets.enable_progress_bars()
