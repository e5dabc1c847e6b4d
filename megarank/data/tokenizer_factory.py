"""The pair tokenizer of a config: which tokenizer folder a run or a checkpoint uses, and the ``PairTokenizer`` on it.

Shared by training (``megarank.training.data``) and scoring (``megarank.scoring``), so that scoring never imports
the training package.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .tokenizer import PairTokenizer, build_tiny_tokenizer, load_tokenizer


def tiny_tokenizer_dir() -> Path:
    """Where the built-in byte-level tokenizer is built (once) for the tiny default model."""
    root = Path(os.environ.get("MEGARANK_CACHE", Path.home() / ".cache" / "megarank"))
    return root / "tiny-tokenizer"


def resolve_tokenizer_dir(cfg, checkpoint_dir: Optional[str] = None) -> Path:
    """data.tokenizer, else ``<checkpoint_dir>/tokenizer`` or ``<checkpoint.load>/tokenizer``, else the built-in
    tiny tokenizer (built on first use)."""
    if cfg.data.tokenizer:
        return Path(cfg.data.tokenizer)
    for candidate in (checkpoint_dir, cfg.checkpoint.load):
        if candidate and (Path(candidate) / "tokenizer").is_dir():
            return Path(candidate) / "tokenizer"
    path = tiny_tokenizer_dir()
    build_tiny_tokenizer(path)
    return path


def make_pair_tokenizer(cfg, tokenizer_dir) -> PairTokenizer:
    """The reranker's input encoder for ``cfg.data`` (template, max_length, max_query_length, pad multiple) on ``tokenizer_dir``."""
    return PairTokenizer(
        load_tokenizer(tokenizer_dir),
        max_length=cfg.data.max_length,
        pad_to_multiple_of=cfg.data.pad_to_multiple_of,
        template=cfg.data.template,
        max_query_length=cfg.data.max_query_length,
    )
