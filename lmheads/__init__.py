"""lmheads: swappable output heads for decoder-only language models."""

__version__ = "0.1.0.dev0"
