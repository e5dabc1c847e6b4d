"""Data for megarank: readers (BEIR and runs in readers.py, training groups files in formats/), prompt template,
tokenization, training groups, DP sampling, batching (``Batcher``).

The shipped sample collection (a tiny BEIR folder plus train_groups.jsonl) is at `sample_data_dir()`.
"""

from __future__ import annotations

from pathlib import Path

from .batcher import Batcher
from .blend import BlendedGroupSource
from .candidates import candidate_pairs
from .errors import DataError
from .formats import GROUP_FORMATS, read_groups, read_jsonl_groups
from .groups import BeirGroupSource, GroupsFileSource
from .readers import (BeirData, Run, ScoredRun, find_run_file, iter_run_rows, read_beir, read_corpus, read_qrels,
                      read_queries, read_run, read_scored_run)
from .sampler import GroupSampler
from .template import DEFAULT_TEMPLATE, doc_to_text, format_pair
from .tokenizer import PairTokenizer, build_tiny_tokenizer, load_tokenizer


def sample_data_dir() -> Path:
    """The tiny hand-written BEIR collection shipped in megarank/resources/sample."""
    return Path(__file__).resolve().parent.parent / "resources" / "sample"


__all__ = [
    "Batcher", "BeirData", "BeirGroupSource", "BlendedGroupSource", "DEFAULT_TEMPLATE", "DataError", "GROUP_FORMATS", "GroupSampler", "GroupsFileSource",
    "PairTokenizer", "Run", "ScoredRun", "build_tiny_tokenizer", "candidate_pairs", "doc_to_text", "find_run_file", "format_pair", "iter_run_rows", "load_tokenizer", "read_beir", "read_corpus", "read_groups",
    "read_jsonl_groups", "read_qrels", "read_queries", "read_run", "read_scored_run", "sample_data_dir",
]
