"""Tokenizers that need no download: characters, UTF-8 bytes, whitespace words, BPE trained locally.

Each one encodes one *record* (a line of a text file, a row of a hub dataset) and round-trips through
a JSON-able dict so the data module can cache it. They are plain picklable objects so that
``datasets.map`` can fingerprint them and reuse its cache.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, ClassVar

from lmheads.errors import ConfigError

if TYPE_CHECKING:
    from tokenizers import Tokenizer as HFTokenizer

UNK = "<unk>"
EOS = "<eos>"
BOS = "<bos>"


class Tokenizer(ABC):
    kind: ClassVar[str]
    #: The id of ``<unk>``, for a tokenizer that maps what its vocabulary lacks to it; else ``None``.
    unk_id: ClassVar[int | None] = None

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of one record."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    @abstractmethod
    def to_dict(self) -> dict: ...

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @staticmethod
    def from_dict(state: dict) -> Tokenizer:
        kinds = {
            cls.kind: cls
            for cls in (CharTokenizer, ByteTokenizer, WordTokenizer, BPETokenizer, PretrainedTokenizer)
        }
        return kinds[state["kind"]]._from_state(state)

    @classmethod
    @abstractmethod
    def _from_state(cls, state: dict) -> Tokenizer: ...


class CharTokenizer(Tokenizer):
    """One token per Unicode character seen in training, plus ``<unk>`` (id 0) for the rest."""

    kind = "char"
    unk_id = 0

    def __init__(self, chars: list[str]) -> None:
        self.itos = [UNK, *chars]
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls(sorted(seen))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(c, 0) for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.itos[i] for i in ids)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": self.itos[1:]}

    @classmethod
    def _from_state(cls, state: dict) -> CharTokenizer:
        return cls(state["chars"])


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255 plus ``<eos>`` (256) and ``<bos>`` (257). Needs no training."""

    kind = "byte"

    @property
    def vocab_size(self) -> int:
        return 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"kind": self.kind}

    @classmethod
    def _from_state(cls, state: dict) -> ByteTokenizer:
        return cls()


class WordTokenizer(Tokenizer):
    """Whitespace-split words with one ``<eos>`` per record: the WikiText-2 word-level convention.

    The vocabulary comes from the training text: ``<unk>`` (0), ``<eos>`` (1), then words by falling
    count (ties alphabetical), keeping words seen at least ``min_count`` times and at most ``max_size``
    entries in all.
    """

    kind = "word"
    unk_id = 0

    def __init__(self, words: list[str]) -> None:
        self.itos = [UNK, EOS, *words]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def train(cls, texts: Iterable[str], min_count: int = 1, max_size: int | None = None) -> WordTokenizer:
        if min_count < 1:
            raise ConfigError(f"data.min_count must be >= 1, got {min_count}")
        if max_size is not None and max_size < 3:
            raise ConfigError(
                f"data.max_vocab must be at least 3 (<unk>, <eos> and one word), got {max_size}"
            )
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(text.split())
        counts.pop(UNK, None)
        counts.pop(EOS, None)
        if not counts:
            raise ConfigError("the training text holds no words (only whitespace); give text to train on")
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        if not words:  # every token <unk>: a loss, perplexity and bits per byte of nothing learned
            raise ConfigError(
                f"data.min_count={min_count} keeps no word: the most frequent one is seen "
                f"{max(counts.values()):,} times in training; give a lower data.min_count"
            )
        if max_size is not None:
            words = words[: max_size - 2]
        return cls(words)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(w, 0) for w in text.split()] + [1]

    def decode(self, ids: Iterable[int]) -> str:
        lines, words = [], []
        for i in ids:
            if i == 1:
                lines.append(" ".join(words) + "\n")
                words = []
            else:
                words.append(self.itos[i])
        return "".join(lines) + " ".join(words)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "words": self.itos[2:]}

    @classmethod
    def _from_state(cls, state: dict) -> WordTokenizer:
        return cls(state["words"])


class _HFTokenizer(Tokenizer):
    """A tokenizer held as an HF ``tokenizers.Tokenizer``, cached as that tokenizer's JSON."""

    def __init__(self, tokenizer: HFTokenizer) -> None:
        self.tokenizer = tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "tokenizer": json.loads(self.tokenizer.to_str())}

    @classmethod
    def _from_state(cls, state: dict) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(json.dumps(state["tokenizer"])))


class BPETokenizer(_HFTokenizer):
    """Byte-level BPE (Sennrich et al. 2016; GPT-2's byte-level variant) trained on the training text
    with HF ``tokenizers``. Every string is representable, so there is no ``<unk>``; ``<eos>`` (id 0)
    ends each record and stands for its line break, as for the word tokenizer."""

    kind = "bpe"

    def __init__(self, tokenizer: HFTokenizer) -> None:
        super().__init__(tokenizer)
        self.eos_id = tokenizer.token_to_id(EOS)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8192) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 257 + 1:
            raise ConfigError(
                f"data.bpe_vocab_size must be at least 258 (256 bytes + <eos> + one merge), got {vocab_size}"
            )
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        lines = [t[:-1] if t.endswith("\n") else t for t in texts]
        return [[*enc.ids, self.eos_id] for enc in self.tokenizer.encode_batch(lines)]

    def decode(self, ids: Iterable[int]) -> str:
        lines, current = [], []
        for i in ids:
            if i == self.eos_id:
                lines.append(self.tokenizer.decode(current) + "\n")
                current = []
            else:
                current.append(i)
        return "".join(lines) + self.tokenizer.decode(current)


class PretrainedTokenizer(_HFTokenizer):
    """A pretrained model's own tokenizer, read from the ``tokenizer.json`` in its local folder (an HF
    model's, such as GPT-2's), so that the data's ids are the ones its embedding was trained on. A
    record is encoded as it is, its line break included; nothing is added."""

    kind = "pretrained"
    folder: str | None = None  # where it was read: its special tokens are named there

    @classmethod
    def from_folder(cls, folder: str) -> PretrainedTokenizer:
        from pathlib import Path

        from tokenizers import Tokenizer as HFTokenizer

        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(
                f"data.tokenizer_path {folder!r} holds no tokenizer.json; give a model's folder"
            )
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as err:  # the tokenizers library raises a bare Exception for a file it cannot parse
            raise ConfigError(
                f"data.tokenizer_path {folder!r}: its tokenizer.json cannot be read as an HF tokenizer "
                f"({err}); give a model's folder with the tokenizer.json its tokenizer saved"
            ) from None
        tokenizer = cls(hf)
        tokenizer.folder = folder
        return tokenizer

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [enc.ids for enc in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids))
