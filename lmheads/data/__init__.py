"""Data modules: the embedded synthetic language and text corpora through HF ``datasets``."""

from lmheads.data.base import BlockDataset, LMDataModule
from lmheads.data.synthetic import HiddenMarkovLanguage, SyntheticDataModule
from lmheads.data.text import TextDataModule

__all__ = ["BlockDataset", "HiddenMarkovLanguage", "LMDataModule", "SyntheticDataModule", "TextDataModule"]
