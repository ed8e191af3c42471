"""Raw text for a language model: local text files or a hub dataset, checked and split.

Local files are refused before the datasets library reads them where they are not UTF-8 text (naming
the first bad byte), and a dataset's text column where it is not strings or holds nulls. An evaluation
file with the training text is named, as its loss would not be a held-out one.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import TYPE_CHECKING

from lightning.pytorch.utilities import rank_zero_info

from lmheads.data.base import file_digest
from lmheads.errors import ConfigError

if TYPE_CHECKING:
    import datasets

_SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "dev"), "test": ("test",)}

#: The share of the training records held out for validation where the data has no validation split.
VAL_FRACTION = 0.05


def load_splits(hp, cache_dir: Path, sources: dict[str, str]) -> tuple[datasets.DatasetDict, str]:
    """The train, validation and test splits of ``TextDataModule``'s options ``hp``, and the column
    holding their text. Each local file read is recorded in ``sources`` by its digest. Without a
    validation split, the last ``hp.val_fraction`` of the training records is held out."""
    import datasets  # half a second of imports, which a run on the synthetic language does without

    hf_cache = str(cache_dir / "datasets")
    if hp.train_file is not None:
        files = {"train": hp.train_file, "validation": hp.validation_file, "test": hp.test_file}
        files = {split: path for split, path in files.items() if path is not None}
        for split, path in files.items():
            p = Path(path)
            if p.is_dir():
                raise ConfigError(f"data.{split}_file {path!r} is a folder; give the text file in it")
            if not p.is_file():
                where = (
                    ""
                    if p.is_absolute()
                    else f" (a relative path is read from the current folder, {Path.cwd()})"
                )
                raise ConfigError(f"data.{split}_file {path!r} does not exist{where}; check the path")
            if p.stat().st_size == 0:
                raise ConfigError(f"data.{split}_file {path!r} is empty; give a file with text in it")
            check_utf8(p, f"data.{split}_file")
            sources[f"{split}_file"] = file_digest(p)  # what a resume or a test must read
        _note_same_text(sources)
        raw = datasets.load_dataset(
            "text",
            data_files={k: str(Path(v).resolve()) for k, v in files.items()},
            keep_linebreaks=True,
            encoding="utf-8-sig",  # a byte-order mark (some editors' first bytes) is not text
            cache_dir=hf_cache,
        )
        text_column = "text"
    else:
        try:
            raw = datasets.load_dataset(hp.dataset_name, hp.dataset_config, cache_dir=hf_cache)
        except (FileNotFoundError, ConnectionError, ValueError) as err:
            raise ConfigError(
                f"could not load dataset {hp.dataset_name!r} (config {hp.dataset_config!r}): {err}. "
                "Check the name and config, or set data.train_file to a local text file"
            ) from err
        text_column = hp.text_column
    splits, names = {}, {}
    for split, aliases in _SPLIT_ALIASES.items():
        name = next((a for a in aliases if a in raw), None)
        if name is not None:
            splits[split], names[split] = raw[name], name
    if "train" not in splits:
        raise ConfigError(f"dataset has no train split (it has: {', '.join(raw)})")
    columns = splits["train"].column_names
    if text_column not in columns:
        raise ConfigError(
            f"dataset has no column {text_column!r} (columns: {', '.join(columns)}); set data.text_column"
        )
    features = splits["train"].features
    if getattr(features[text_column], "dtype", None) not in ("string", "large_string"):
        kinds = ", ".join(f"{c} ({getattr(f, 'dtype', type(f).__name__)})" for c, f in features.items())
        raise ConfigError(
            f"dataset column {text_column!r} does not hold text (columns: {kinds}); set data.text_column "
            "to a column of strings"
        )
    for split, records in splits.items():  # Arrow counts a column's nulls without reading it
        if nulls := records.data.column(text_column).null_count:
            raise ConfigError(
                f"dataset column {text_column!r} is null in {nulls:,} of the {len(records):,} {split} "
                "records; remove those records (Dataset.filter), or set data.text_column to a column "
                "without nulls"
            )
    if "validation" not in splits:
        n_train = len(splits["train"])
        n_val = max(1, round(hp.val_fraction * n_train))
        if n_val >= n_train:
            raise ConfigError(
                f"the training text is {n_train} record(s) (a text file's lines), and the validation "
                f"split is held out as the last {hp.val_fraction:g} of them: give data.validation_file "
                "(or a dataset with a validation split), or training text of more lines"
            )
        splits["validation"] = splits["train"].select(range(n_train - n_val, n_train))
        splits["train"] = splits["train"].select(range(n_train - n_val))
    elif hp.val_fraction != VAL_FRACTION:  # it would be recorded with the run and hold nothing out
        given = (
            "data.validation_file" if hp.train_file is not None else f"the dataset's {names['validation']!r}"
        )
        raise ConfigError(
            f"data.val_fraction={hp.val_fraction:g} holds out training text only where there is no "
            f"validation split, and this run validates on {given}: remove data.val_fraction (or set it to "
            f"{VAL_FRACTION:g})"
        )
    return datasets.DatasetDict(splits), text_column


def _note_same_text(sources: dict[str, str]) -> None:
    """A line for an evaluation file with the same bytes as the training file, or a test file with those
    of the validation file (on which the best checkpoint is chosen), under any path: not held-out text."""
    why = {
        "train": "its loss is a training loss",
        "validation": "the best checkpoint is chosen on it, so its loss is not a held-out one either",
    }
    for split, earlier in (("validation", ("train",)), ("test", ("train", "validation"))):
        digest = sources.get(f"{split}_file")
        same = next((e for e in earlier if digest is not None and digest == sources.get(f"{e}_file")), None)
        if same is not None:
            rank_zero_info(f"data: data.{split}_file holds the same text as data.{same}_file: {why[same]}")


def check_utf8(path: Path, option: str, block: int = 1 << 20) -> None:
    """Refuse a file that is not UTF-8 text, naming the byte offset of the first bad byte. A NUL byte is
    valid UTF-8 but no text holds one: it marks a binary file."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as f:
        while chunk := f.read(block):
            if (nul := chunk.find(b"\0")) >= 0:
                raise ConfigError(
                    f"{option} {str(path)!r} holds a NUL byte (byte {offset + nul}): it is a binary file, "
                    "not text; give a UTF-8 text file"
                )
            pending = len(decoder.getstate()[0])  # bytes of a character split by the last block
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                bad = offset - pending + err.start
                raise ConfigError(
                    f"{option} {str(path)!r} is not UTF-8 text (byte {bad}: {err.reason}); convert it, e.g. "
                    f"iconv -f latin1 -t utf-8, or give a text file"
                ) from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{option} {str(path)!r} ends inside a UTF-8 character ({err.reason})") from None
