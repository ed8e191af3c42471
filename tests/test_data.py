from __future__ import annotations

import errno
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml

import lmheads.data.text as text_module
from lmheads.data.base import ResumableSampler, StreamBlocks, stream_blocks
from lmheads.data.text import TextDataModule
from lmheads.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    PretrainedTokenizer,
    Tokenizer,
    WordTokenizer,
)
from lmheads.errors import ConfigError

from .helpers import ROOT

SAMPLE = "Ünïcode läuft 😀\nthe cat sat on the mat\n\nthe end\n"


def test_char_round_trip_and_unknown():
    tok = CharTokenizer.train([SAMPLE])
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    assert tok.encode("Q") == [0]  # unseen -> <unk>


def test_byte_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode(SAMPLE)
    assert max(ids) < 256 and tok.decode(ids) == SAMPLE
    assert len(ids) == len(SAMPLE.encode())


def test_word_vocabulary_and_eos():
    lines = SAMPLE.splitlines(keepends=True)
    tok = WordTokenizer.train(lines)
    assert tok.itos[:3] == ["<unk>", "<eos>", "the"]  # specials, then by falling count
    ids = tok.encode("the cat ate\n")
    assert ids == [tok.stoi["the"], tok.stoi["cat"], 0, 1]
    assert tok.decode(tok.encode("the cat sat")) == "the cat sat\n"
    capped = WordTokenizer.train(lines, max_size=4)
    assert capped.vocab_size == 4
    assert WordTokenizer.train(lines, min_count=2).itos[2:] == ["the"]
    # nothing but <unk> to learn: the metrics of such a run measure nothing
    with pytest.raises(
        ConfigError, match=r"data.min_count=4 keeps no word: the most frequent one is seen 3 "
    ):
        WordTokenizer.train(lines, min_count=4)
    with pytest.raises(ConfigError, match=r"the training text holds no words \(only whitespace\)"):
        WordTokenizer.train([" \n", "\n"])


def test_bpe_round_trip_and_merges():
    lines = SAMPLE.splitlines(keepends=True) * 20
    tok = BPETokenizer.train(lines, vocab_size=300)
    assert 258 < tok.vocab_size <= 300  # bytes, <eos> and learned merges
    ids = tok.encode_batch(lines[:4])
    assert all(row[-1] == tok.eos_id for row in ids)  # <eos> ends each line and stands for its newline
    assert tok.decode([i for row in ids for i in row]) == "".join(lines[:4])
    assert len(tok.encode("the cat sat on the mat")) < len("the cat sat on the mat")  # merges apply
    with pytest.raises(ConfigError, match="bpe_vocab_size"):
        BPETokenizer.train(lines, vocab_size=100)


def test_a_pretrained_tokenizer_folder_needs_a_readable_tokenizer_json(tmp_path):
    with pytest.raises(ConfigError, match=r"holds no tokenizer\.json; give a model's folder"):
        PretrainedTokenizer.from_folder(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")  # a truncated download, an LFS pointer
    with pytest.raises(ConfigError, match=r"tokenizer\.json cannot be read as an HF tokenizer \(key must be"):
        PretrainedTokenizer.from_folder(str(tmp_path))


@pytest.mark.parametrize(
    "tok",
    [
        CharTokenizer.train([SAMPLE]),
        ByteTokenizer(),
        WordTokenizer.train([SAMPLE]),
        BPETokenizer.train([SAMPLE] * 5, vocab_size=280),
    ],
)
def test_serialisation(tok):
    again = Tokenizer.from_dict(tok.to_dict())
    assert again.encode(SAMPLE) == tok.encode(SAMPLE)
    assert again.fingerprint() == tok.fingerprint()


def test_packing_scores_every_token_once():
    stream = np.arange(23)
    blocks = stream_blocks(stream, 5, "train")  # windows of 6 tokens, stride 5
    assert blocks.shape == (4, 6)
    targets = np.concatenate([b[1:] for b in blocks])
    assert np.array_equal(targets, np.arange(1, 21))  # each token after the first exactly once
    with pytest.raises(ConfigError, match="fewer than block_size"):
        stream_blocks(np.arange(5), 5, "validation")


def test_random_offsets_cut_each_epoch_at_its_own_offset():
    T, seed = 10, 3
    data = StreamBlocks(np.arange(1000), T, "train")  # token i is i: a window shows where it was cut
    fixed = ResumableSampler(data, 1, 0, shuffle=True, seed=seed)
    assert sorted(fixed) == list(range(len(data)))  # without offsets: the blocks, as before
    offsets = []
    for epoch in range(6):
        sampler = ResumableSampler(data, 1, 0, shuffle=True, seed=seed, random_offsets=True)
        sampler.set_epoch(epoch)
        keys = list(sampler)
        assert len(keys) == len(sampler) == data.blocks_at_any_offset() == 99  # 99 fit at every offset
        assert len({offset for offset, _ in keys}) == 1  # one offset an epoch
        offsets.append(keys[0][0])
        targets = []
        for key in keys:
            x, y = data[key]
            start = key[0] + key[1] * T
            assert x.tolist() == list(range(start, start + T))
            assert y.tolist() == list(range(start + 1, start + T + 1))
            targets += y.tolist()
        assert len(targets) == len(set(targets))  # no token is a target twice in an epoch
        again = ResumableSampler(data, 1, 0, shuffle=True, seed=seed, random_offsets=True)
        again.set_epoch(epoch)
        again.start = 40  # resumed part-way: the same epoch's remaining blocks, at the same offset
        assert list(again) == keys[40:]
    assert len(set(offsets)) > 1 and all(0 <= o < T for o in offsets)
    # two processes: the same offset, disjoint shards
    ranks = []
    for rank in (0, 1):
        sampler = ResumableSampler(data, 2, rank, shuffle=True, seed=seed, random_offsets=True)
        sampler.set_epoch(4)
        ranks.append(list(sampler))
    assert {o for o, _ in ranks[0]} == {o for o, _ in ranks[1]} == {offsets[4]}
    assert not {i for _, i in ranks[0]} & {i for _, i in ranks[1]}


@pytest.fixture
def text_files(tmp_path):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "épsilon"]
    lines = [" ".join(rng.choice(words, size=rng.integers(1, 12))) + "\n" for _ in range(400)]
    train, valid = tmp_path / "train.txt", tmp_path / "valid.txt"
    train.write_text("".join(lines[:350]), encoding="utf-8")
    valid.write_text("".join(lines[350:]), encoding="utf-8")
    return train, valid


@pytest.mark.parametrize("tokenizer", ["char", "byte", "word", "bpe"])
def test_text_module_splits_and_bytes(text_files, tokenizer, tmp_path):
    train, valid = text_files
    options = {"bpe_vocab_size": 300} if tokenizer == "bpe" else {}
    dm = TextDataModule(
        train_file=str(train), validation_file=str(valid), tokenizer=tokenizer, block_size=16,
        cache_dir=str(tmp_path), **options,
    )  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    stream = np.load(dm.stream_path("validation"))
    text = valid.read_text(encoding="utf-8")
    if tokenizer != "word":  # char, byte and BPE streams decode back to the file exactly
        assert dm.tokenizer.decode(stream.tolist()) == text
    else:
        assert len(stream) == len(text.split()) + text.count("\n")
    assert dm.bytes_per_token["validation"] == len(text.encode("utf-8")) / len(stream)
    x, y = dm.splits["train"][0]
    assert x.shape == y.shape == (16,) and (x[1:] == y[:-1]).all()


def test_cache_reuse_does_not_tokenize_again(text_files, tmp_path, monkeypatch):
    train, valid = text_files
    kwargs = dict(
        train_file=str(train), validation_file=str(valid), tokenizer="word", cache_dir=str(tmp_path)
    )
    first = TextDataModule(**kwargs)
    first.prepare_data()
    path = first.stream_path("train")
    mtime = path.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(text_module, "encode_batch", fail)
    monkeypatch.setattr(WordTokenizer, "train", fail)
    second = TextDataModule(**kwargs)  # tokenizer from cache
    second.prepare_data()  # streams from cache
    second.setup("fit")
    assert second.stream_path("train") == path and path.stat().st_mtime_ns == mtime
    assert second.tokenizer.itos == first.tokenizer.itos
    first.setup("fit")
    counts = first.train_token_counts()  # counted once, kept beside the stream for later runs
    assert counts.sum() == len(first.splits["train"]) * first.block_size
    assert np.array_equal(second.train_token_counts(), counts)


def test_changed_file_invalidates_cache(text_files, tmp_path):
    train, valid = text_files
    kwargs = dict(
        train_file=str(train), validation_file=str(valid), tokenizer="word", cache_dir=str(tmp_path)
    )
    first = TextDataModule(**kwargs)
    train.write_text(train.read_text() + "zeta zeta\n", encoding="utf-8")
    second = TextDataModule(**kwargs)
    assert "zeta" in second.tokenizer.stoi and "zeta" not in first.tokenizer.stoi
    assert second.stream_path("train") != first.stream_path("train")


def test_a_cache_that_cannot_be_written_is_one_line_and_a_full_disk_leaves_no_partial_file(
    text_files, tmp_path, monkeypatch
):
    """A cache folder that cannot be made (a file in its way, a read-only home) is named with what to
    set, not the datasets library's page of errors; a disk that fills while a split is written leaves no
    partial stream, and the next run tokenizes that split whole."""
    train, valid = text_files
    in_the_way = tmp_path / "file"
    in_the_way.write_text("")
    with pytest.raises(
        ConfigError, match=r"file/cache cannot be written \(Not a directory\); set data\.cache_dir"
    ):
        TextDataModule(train_file=str(train), cache_dir=str(in_the_way / "cache"))
    cache = tmp_path / "cache"
    dm = TextDataModule(
        train_file=str(train), validation_file=str(valid), tokenizer="word", cache_dir=str(cache)
    )
    save = np.save

    def fills_the_disk(path, array):
        Path(path).write_bytes(b"part of a stream")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", fills_the_disk)
    with pytest.raises(
        ConfigError, match=r"\(No space left on device\); free space there, or set data\.cache_dir"
    ):
        dm.prepare_data()
    assert not list((cache / "streams").iterdir())
    monkeypatch.setattr(np, "save", save)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.stream_path("train").is_file() and len(dm.splits["train"]) > 0
    kept = set((cache / "streams").iterdir())
    monkeypatch.setattr(np, "save", fills_the_disk)  # the training counts kept beside the stream
    with pytest.raises(ConfigError, match=r"\(No space left on device\); free space there"):
        dm.train_token_counts()
    assert set((cache / "streams").iterdir()) == kept


@pytest.mark.parametrize("step", ["load_dataset", "map"])
def test_a_full_disk_under_the_datasets_librarys_cache_is_one_line(text_files, tmp_path, monkeypatch, step):
    """The datasets library writes its Arrow files into the cache too, as it reads the text and as it
    tokenizes: a full disk there ended in a traceback through its code."""
    import datasets

    train, valid = text_files

    def full(*args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as err:
            raise RuntimeError("an error of the datasets library's own") from err

    monkeypatch.setattr(datasets if step == "load_dataset" else datasets.Dataset, step, full)
    message = f"the data cache {tmp_path} cannot be written (No space left on device); free space there"
    with pytest.raises(ConfigError, match=re.escape(message)):
        dm = TextDataModule(train_file=str(train), validation_file=str(valid), cache_dir=str(tmp_path))
        dm.prepare_data()


def test_a_training_split_too_short_for_one_batch_on_every_process_is_refused(tmp_path):
    """A training split with fewer blocks than one batch, at any offset with random offsets, or on each
    process under DDP, would train nothing (the loader drops the short batch): one line instead."""
    from types import SimpleNamespace

    train, valid = tmp_path / "train.txt", tmp_path / "valid.txt"
    train.write_text("ab" * 25 + "\n")  # 51 characters: one block of 32 at offset 0, none at every offset
    valid.write_text("ab" * 100 + "\n")
    options = {"train_file": str(train), "validation_file": str(valid), "cache_dir": str(tmp_path)}

    def loader(batch_size: int, world_size: int = 1, random_offsets: bool = False):
        dm = TextDataModule(**options, block_size=32, batch_size=batch_size, random_offsets=random_offsets)
        dm.setup("fit")
        dm.trainer = SimpleNamespace(world_size=world_size, global_rank=0, current_epoch=0)
        return dm.train_dataloader()

    assert len(loader(1)) == 1
    with pytest.raises(
        ConfigError, match=r"has 0 blocks of 32 tokens at every offset \(data\.random_offsets\)"
    ):
        loader(1, random_offsets=True)
    train.write_text("ab" * 100 + "\n")  # 6 blocks
    assert len(loader(3, world_size=2)) == 1
    with pytest.raises(
        ConfigError, match=r"has 6 blocks of 32 tokens, fewer than one batch of 4 on each of 2 processes"
    ):
        loader(4, world_size=2)


def test_a_byte_order_mark_is_not_text(tmp_path):
    """A file that starts with a UTF-8 byte-order mark (as some editors save text) trains on its text
    alone: the same tokenizer, tokens and bytes per token as without it, not a U+FEFF character or a
    '\ufeffthe' word of its own."""
    plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
    plain.write_text("the cat sat\nthe dog sat\n" * 100, encoding="utf-8")
    marked.write_text(plain.read_text(), encoding="utf-8-sig")
    assert marked.read_bytes()[:3] == b"\xef\xbb\xbf"
    for tokenizer in ("char", "word"):
        modules = []
        for path in (plain, marked):
            dm = TextDataModule(
                train_file=str(path), tokenizer=tokenizer, block_size=8, cache_dir=str(tmp_path)
            )
            dm.prepare_data()
            dm.setup("fit")
            modules.append(dm)
        assert modules[1].tokenizer.to_dict() == modules[0].tokenizer.to_dict()
        for split in ("train", "validation"):
            assert np.array_equal(
                np.load(modules[1].stream_path(split)), np.load(modules[0].stream_path(split))
            )
            assert modules[1].bytes_per_token[split] == modules[0].bytes_per_token[split]


def test_validation_carved_from_train_when_absent(text_files, tmp_path):
    train, _ = text_files
    dm = TextDataModule(train_file=str(train), tokenizer="char", val_fraction=0.1, cache_dir=str(tmp_path))
    assert len(dm.raw["validation"]) == 35 and len(dm.raw["train"]) == 315
    assert "test" not in dm.raw


def test_evaluation_tokens_no_training_text_holds_are_named(tmp_path, caplog):
    """A word (or character) of the validation text outside the training vocabulary becomes <unk>, which
    the training text never holds when every training word is kept: no model learns it. Setup says how
    many tokens that is, and what to change; none is said where training holds <unk> too."""
    train, valid = tmp_path / "train.txt", tmp_path / "valid.txt"
    train.write_text("the cat sat on the mat\nthe dog sat\n" * 50)
    valid.write_text("the cat sat on the rug\n")  # 1 of 7 tokens (6 words and <eos>) unknown
    for tokenizer, min_count, note in (("word", 1, "data.min_count=2"), ("char", 1, "data.tokenizer=byte")):
        dm = TextDataModule(train_file=str(train), validation_file=str(valid), tokenizer=tokenizer,
                            min_count=min_count, block_size=4, cache_dir=str(tmp_path / "cache"))  # fmt: skip
        caplog.clear()
        with caplog.at_level("INFO"):
            dm.setup("fit")
            dm.setup("validate")  # said once
        share = 1 / 7 if tokenizer == "word" else 2 / 23  # "r" and "g"; 22 characters and the newline
        assert dm.unknown == {"train": 0.0, "validation": pytest.approx(share)}
        assert caplog.text.count(f"data: {share:.2%} of the validation tokens are outside the training ") == 1
        assert note in caplog.text
    dm = TextDataModule(train_file=str(train), validation_file=str(valid), tokenizer="word", min_count=60,
                        block_size=4, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    dm.setup("fit")
    assert dm.unknown["train"] > 0 and dm.unknown_note() is None


def test_an_evaluation_file_with_the_training_text_is_named(text_files, tmp_path, caplog):
    """A validation or test file that holds the training file's text (a copy-pasted path, a copied file)
    scores the model on what it trained on, and a test file with the validation text scores it on the text
    its best checkpoint was chosen on: each said, as its loss is not a held-out loss."""
    train, valid = text_files
    copy = tmp_path / "copy.txt"
    copy.write_bytes(train.read_bytes())
    with caplog.at_level("INFO"):
        TextDataModule(train_file=str(train), validation_file=str(valid), test_file=str(copy),
                       cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert (
        caplog.text.count("data: data.test_file holds the same text as data.train_file: its loss is a") == 1
    )
    assert "validation_file holds" not in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):  # the best checkpoint is chosen on the validation text
        TextDataModule(train_file=str(train), validation_file=str(valid), test_file=str(valid),
                       cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert caplog.text.count("data.test_file holds the same text as data.validation_file: the best") == 1
    caplog.clear()
    with caplog.at_level("INFO"):  # neither a test file nor a validation file: the validation is held out
        TextDataModule(train_file=str(train), validation_file=str(valid), cache_dir=str(tmp_path / "cache"))
        TextDataModule(train_file=str(train), cache_dir=str(tmp_path / "cache"))
    assert "same text" not in caplog.text


def _hub_copy(folder: Path, configs: dict[str, dict[str, list[str]]]) -> None:
    """A dataset folder laid out as a hub repository is: one folder of parquet files per configuration,
    named in the README's metadata."""
    card = ["---", "configs:"]
    for config, splits in configs.items():
        card += [f"- config_name: {config}", "  data_files:"]
        for split, rows in splits.items():
            (folder / config).mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_dict({"text": rows}).to_parquet(str(folder / config / f"{split}-0.parquet"))
            card += [f"  - split: {split}", f"    path: {config}/{split}-*"]
    (folder / "README.md").write_text("\n".join([*card, "---", ""]))


def test_the_hub_config_is_the_local_word_level_wikitext(tmp_path):
    """configs/data/wikitext2-hub.yaml trains on the tokenized WikiText-2 (rare words already <unk>, the
    33,278-word vocabulary of the literature and of the local files), not the raw text, whose rare
    words are kept: trained on, and unknown to the vocabulary where only the validation text has them.
    A copy laid out as the hub dataset (blank lines as empty rows, as there) gives the local files'
    vocabulary and token streams."""
    lines = {
        "train": [" = A = \n", " \n", " the <unk> sat on the mat \n", " the cat sat \n"] * 30,
        "validation": [" the <unk> sat \n", " \n", " the cat \n"],
    }
    files = {}
    for split, split_lines in lines.items():
        files[split] = tmp_path / f"{split}.txt"
        files[split].write_text("".join(split_lines))
    rare = iter(f"rare{i}" for i in range(1000))
    raw = {s: [line.replace("<unk>", next(rare)) for line in split_lines] for s, split_lines in lines.items()}
    hub_rows = {s: [line if line.strip() else "" for line in split_lines] for s, split_lines in lines.items()}
    _hub_copy(tmp_path / "wikitext", {"wikitext-2-v1": hub_rows, "wikitext-2-raw-v1": raw})
    config = yaml.safe_load((ROOT / "configs" / "data" / "wikitext2-hub.yaml").read_text())["data"]
    assert config["init_args"]["dataset_name"] == "Salesforce/wikitext"
    args = {
        **config["init_args"],
        "dataset_name": str(tmp_path / "wikitext"),
        "cache_dir": str(tmp_path / "c"),
    }
    hub = TextDataModule(**args)
    local = TextDataModule(train_file=str(files["train"]), validation_file=str(files["validation"]),
                           tokenizer="word", cache_dir=str(tmp_path / "c"))  # fmt: skip
    assert hub.tokenizer.itos == local.tokenizer.itos
    for dm in (hub, local):
        dm.prepare_data()
    for split in ("train", "validation"):
        assert np.array_equal(np.load(hub.stream_path(split)), np.load(local.stream_path(split)))


def test_hub_loading_path_with_a_local_dataset_dir(tmp_path, text_files):
    """`dataset_name` goes through `datasets.load_dataset(name, config)`, as for a hub name."""
    train, valid = text_files
    ds_dir = tmp_path / "my_corpus"
    ds_dir.mkdir()
    import json

    for split, src in (("train", train), ("validation", valid)):
        rows = [
            {"content": line, "n": i}
            for i, line in enumerate(src.read_text(encoding="utf-8").splitlines(True))
        ]
        (ds_dir / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    dm = TextDataModule(
        dataset_name=str(ds_dir), text_column="content", tokenizer="word", cache_dir=str(tmp_path)
    )
    assert set(dm.raw) == {"train", "validation"}
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.splits["train"]) > 0
    with pytest.raises(ConfigError, match="no column 'text'"):
        TextDataModule(dataset_name=str(ds_dir), tokenizer="word", cache_dir=str(tmp_path))
    with pytest.raises(
        ConfigError, match=r"column 'n' does not hold text \(columns: content \(string\), n \(int64\)\)"
    ):
        TextDataModule(dataset_name=str(ds_dir), text_column="n", cache_dir=str(tmp_path))
    held_out = r"^data.val_fraction=0.1 holds out training text only where there is no validation split, "
    with pytest.raises(
        ConfigError, match=held_out + "and this run validates on the dataset's 'validation': "
    ):
        TextDataModule(
            dataset_name=str(ds_dir), text_column="content", val_fraction=0.1, cache_dir=str(tmp_path)
        )
    with (ds_dir / "validation.jsonl").open("a") as f:  # a record without text: tokenizers cannot take it
        f.write('\n{"content": null, "n": 0}')
    with pytest.raises(ConfigError, match=r"column 'content' is null in 1 of the .* validation records"):
        TextDataModule(dataset_name=str(ds_dir), text_column="content", cache_dir=str(tmp_path / "2"))


@pytest.mark.parametrize(("num_proc", "expected"), [(0, None), (2, 2)])
def test_num_proc_0_tokenizes_in_this_process(tmp_path, monkeypatch, num_proc, expected):
    """As with ``num_workers``, 0 extra processes: not the default of one per core."""
    import datasets

    text = tmp_path / "lines.txt"
    text.write_text("a b\n" * 12_000)  # enough records to tokenize in parallel
    given = []
    run_map = datasets.Dataset.map

    def spy(self, *args, **kwargs):
        given.append(kwargs.get("num_proc"))
        return run_map(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", spy)
    dm = TextDataModule(train_file=str(text), tokenizer="word", num_proc=num_proc, cache_dir=str(tmp_path))
    dm.prepare_data()
    assert given[0] == expected  # the training split's (the held-out validation is too small to split)


def test_bad_inputs(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        TextDataModule(train_file=str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        TextDataModule(train_file=str(empty))
    one_line = tmp_path / "one_line.txt"  # as text8 is: the held-out split is lines, so say what to give
    one_line.write_text("a long text on one line " * 1000)
    with pytest.raises(
        ConfigError, match=r"is 1 record\(s\) .* last 0.05 of them: give data.validation_file"
    ):
        TextDataModule(train_file=str(one_line), cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="exactly one of"):
        TextDataModule()
    with pytest.raises(
        ConfigError, match=r"data\.num_proc must be >= 0 \(0: tokenize in this process\), got -1"
    ):
        TextDataModule(train_file=str(one_line), num_proc=-1, cache_dir=str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()  # refused before the cache folder is made
    with pytest.raises(ConfigError, match="could not load dataset"):
        TextDataModule(dataset_name=str(tmp_path / "no_such_dataset"), cache_dir=str(tmp_path))


def test_a_held_out_share_beside_a_validation_file_is_refused(text_files, tmp_path):
    """It would be recorded with the run, and set runs that validate alike apart in the reports."""
    train, valid = text_files
    files = {"train_file": str(train), "validation_file": str(valid), "cache_dir": str(tmp_path)}
    with pytest.raises(
        ConfigError, match=r"validates on data.validation_file: remove data.val_fraction \(or set"
    ):
        TextDataModule(**files, val_fraction=0.1)
    assert TextDataModule(**files, val_fraction=0.05).hparams.val_fraction == 0.05


@pytest.mark.parametrize(
    ("option", "value", "source"),
    [
        ("validation_file", "valid.txt", "train_file"),
        ("test_file", "test.txt", "train_file"),
        ("dataset_config", "wikitext-2-v1", "dataset_name"),
        ("text_column", "content", "dataset_name"),
    ],
)
def test_the_other_sources_option_is_refused(text_files, tmp_path, option, value, source):
    """A local test file beside a hub dataset was ignored, and the run tested on the hub's test split."""
    train, _ = text_files
    given = (
        {"dataset_name": str(tmp_path / "a_dataset")}
        if source == "train_file"
        else {"train_file": str(train)}
    )
    with pytest.raises(ConfigError, match=rf"data.{option}='{value}' is read with data.{source} only, and"):
        TextDataModule(cache_dir=str(tmp_path / "never"), **given, **{option: value})
    assert not (tmp_path / "never").exists()  # refused before anything was written


@pytest.mark.parametrize(
    ("option", "value", "reader", "others"),
    [("min_count", 2, "word", ["char", "byte", "bpe"]), ("max_vocab", 100, "word", ["char", "byte", "bpe"]),
     ("bpe_vocab_size", 300, "bpe", ["char", "byte", "word"])],
)  # fmt: skip
def test_another_tokenizers_option_is_refused(text_files, tmp_path, option, value, reader, others):
    """An option that the chosen tokenizer does not read would be recorded with the run and change
    nothing; the tokenizer that reads it takes it."""
    train, _ = text_files
    for tokenizer in others:
        with pytest.raises(
            ConfigError, match=rf"data.{option}={value} is read by data.tokenizer={reader} only"
        ):
            TextDataModule(
                train_file=str(train), tokenizer=tokenizer, cache_dir=str(tmp_path), **{option: value}
            )
    assert not (tmp_path / "tokenizers").exists()  # refused before anything was written
    dm = TextDataModule(train_file=str(train), tokenizer=reader, cache_dir=str(tmp_path), **{option: value})
    assert dm.hparams[option] == value


def test_wikitext2_word_level_counts(shared_data, tmp_path):
    """The WikiText-2 convention of Press & Wolf 2017 and pytorch/examples: 33,278 types."""
    root = shared_data / "wikitext-2"
    dm = TextDataModule(
        train_file=str(root / "train.txt"),
        validation_file=str(root / "valid.txt"),
        test_file=str(root / "test.txt"),
        tokenizer="word",
        cache_dir=str(tmp_path),
    )
    assert dm.vocab_size == 33_278
    dm.prepare_data()
    lengths = {
        split: len(np.load(dm.stream_path(split), mmap_mode="r")) for split in ("train", "validation", "test")
    }
    assert lengths == {"train": 2_088_628, "validation": 217_646, "test": 245_569}


def test_tinyshakespeare_chars(shared_data, tmp_path):
    dm = TextDataModule(
        train_file=str(shared_data / "tinyshakespeare" / "input.txt"), cache_dir=str(tmp_path)
    )
    assert dm.vocab_size == 65 + 1  # 65 characters and <unk>
