"""lmheads' tokenizers as HF tokenizers (``PreTrainedTokenizerFast``) with the same ids, for an export's
``tokenizer.json``: ``AutoTokenizer`` then encodes text as the run did, without lmheads."""

from __future__ import annotations

import json
from pathlib import Path

from lmheads.data.tokenizers import (
    BOS,
    EOS,
    UNK,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    PretrainedTokenizer,
    Tokenizer,
    WordTokenizer,
)
from lmheads.errors import ConfigError


def hf_tokenizer(tokenizer: Tokenizer):
    """lmheads' tokenizer as a ``PreTrainedTokenizerFast`` with the same ids: characters, UTF-8 bytes,
    whitespace words (a line break is ``<eos>``, as each record ends with one) or byte-level BPE (the
    same)."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as Fast
    from transformers import PreTrainedTokenizerFast

    special = {}
    if isinstance(tokenizer, CharTokenizer):  # BPE without merges: one token a character
        fast = Fast(models.BPE(dict(tokenizer.stoi), [], unk_token=UNK))
        fast.decoder = decoders.Fuse()
        special["unk_token"] = UNK
    elif isinstance(tokenizer, ByteTokenizer):  # byte-level BPE without merges: one token a byte
        fast = Fast(models.BPE({_byte_symbol(b): b for b in range(256)}, []))
        fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        fast.decoder = decoders.ByteLevel()
        fast.add_special_tokens([AddedToken(EOS, special=True), AddedToken(BOS, special=True)])
        special.update(eos_token=EOS, bos_token=BOS)
    elif isinstance(tokenizer, WordTokenizer):
        fast = Fast(models.WordLevel(dict(tokenizer.stoi), unk_token=UNK))
        fast.normalizer = normalizers.Replace(Regex("\n"), f" {EOS} ")
        fast.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        fast.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
        special.update(unk_token=UNK, eos_token=EOS)
    elif isinstance(tokenizer, BPETokenizer):
        fast = Fast.from_str(tokenizer.tokenizer.to_str())
        fast.normalizer = normalizers.Replace(Regex("\n"), EOS)
        fast.add_special_tokens([AddedToken(EOS, special=True, normalized=True)])
        special["eos_token"] = EOS
    elif isinstance(tokenizer, PretrainedTokenizer):  # the model's own, its special tokens as it names them
        fast = Fast.from_str(tokenizer.tokenizer.to_str())
        special = _named_tokens(tokenizer.folder, fast.get_vocab()) if tokenizer.folder else {}
    else:
        raise ConfigError(f"no tokenizer.json for a {type(tokenizer).__name__}")
    return PreTrainedTokenizerFast(tokenizer_object=fast, **special)


def _named_tokens(folder: str, vocab: dict[str, int]) -> dict[str, str]:
    """The beginning, end, unknown and padding tokens a pretrained tokenizer's folder names (in
    ``special_tokens_map.json`` or ``tokenizer_config.json``, as ``save_pretrained`` writes them), where
    its vocabulary holds them."""
    named = {}
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            config = json.loads((Path(folder) / file).read_text())
        except (OSError, ValueError):
            continue
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            token = config.get(key)
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and token in vocab:
                named.setdefault(key, token)
    return named


def _byte_symbol(b: int) -> str:
    """GPT-2's printable stand-in for byte ``b`` (the byte-level alphabet)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    if b in printable:
        return chr(b)
    return chr(256 + sorted(set(range(256)) - set(printable)).index(b))
