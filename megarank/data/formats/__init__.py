"""Training groups files, one reader per format (``data.format`` other than ``beir``). Each returns
``(groups, n_skipped)``: a sequence of group dicts (``{"query", "pos", "neg", "at"}`` with texts, plus the
optional ``pos_scores``, ``neg_scores``, ``pos_labels``, ``prompt``) that ``GroupsFileSource`` turns into
``TrainingGroup``s. The Arrow and corpus-id readers build a group when it is indexed, not when the file is read.

- ``jsonl``: JSONL groups in NeMo AutoModel's inline spelling or FlagEmbedding's (`jsonl.py`);
- ``nemo_corpus``: NeMo AutoModel's corpus-id JSON and its corpus folders (`nemo_corpus.py`);
- ``parquet`` / ``hf_disk``: Parquet files, ``datasets`` ``save_to_disk`` folders, columns mapped (`arrow.py`);
- ``triples``: MS MARCO-style ``query \\t positive \\t negative`` lines grouped by query (`triples.py`).
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

from .jsonl import check_prompts, read_jsonl_groups
from .triples import read_triples

GROUP_FORMATS = ("jsonl", "nemo_corpus", "parquet", "hf_disk", "triples")


def read_groups(fmt: str, path: str | os.PathLike, columns: Optional[Mapping[str, str]] = None,
                split: str = "train", skip_bad: bool = False) -> tuple[Sequence[dict], int]:
    """The groups of the training file `path` in format `fmt` (one of GROUP_FORMATS): ``(groups, n_skipped)``.
    `columns` maps megarank's field names to Parquet / ``datasets`` column names; `split` picks a ``DatasetDict``
    split of an ``hf_disk`` folder; `skip_bad` skips (and counts) bad lines, rows or records."""
    if fmt == "jsonl":
        return read_jsonl_groups(path, skip_bad_lines=skip_bad)
    if fmt == "triples":
        return read_triples(path, skip_bad_lines=skip_bad)
    # pyarrow is imported by the formats that need it only.
    if fmt == "nemo_corpus":
        from .nemo_corpus import read_nemo_corpus_groups

        return read_nemo_corpus_groups(path, skip_bad_records=skip_bad)
    if fmt == "parquet":
        from .arrow import read_parquet_groups

        return read_parquet_groups(path, columns or {}, skip_bad_rows=skip_bad)
    if fmt == "hf_disk":
        from .arrow import read_hf_disk_groups

        return read_hf_disk_groups(path, columns or {}, split=split, skip_bad_rows=skip_bad)
    raise ValueError(f"unknown training groups format {fmt!r}; expected one of {', '.join(GROUP_FORMATS)}")


def open_groups(fmt: str, path: str | os.PathLike, columns: Optional[Mapping[str, str]] = None,
                split: str = "train", skip_bad: bool = False) -> tuple[Sequence[dict], int]:
    """`read_groups` for training: the same groups, the same errors, but JSONL, triples, Parquet, `hf_disk` are read
    through an index built once (`index.py`) and memory-mapped, each group parsed when it is indexed
    (`indexed.py`; Parquet and ``hf_disk`` through an Arrow copy beside the index, `arrow.open_parquet_groups`;
    ``nemo_corpus`` through its resolved document rows and an Arrow copy of its corpora,
    `nemo_corpus.open_nemo_corpus_groups`)."""
    if fmt == "jsonl":
        from .indexed import open_jsonl_groups

        return open_jsonl_groups(path, skip_bad_lines=skip_bad)
    if fmt == "triples":
        from .indexed import open_triples

        return open_triples(path, skip_bad_lines=skip_bad)
    if fmt == "parquet":
        from .arrow import open_parquet_groups

        return open_parquet_groups(path, columns or {}, skip_bad_rows=skip_bad)
    if fmt == "hf_disk":
        from .arrow import open_hf_disk_groups

        return open_hf_disk_groups(path, columns or {}, split=split, skip_bad_rows=skip_bad)
    if fmt == "nemo_corpus":
        from .nemo_corpus import open_nemo_corpus_groups

        return open_nemo_corpus_groups(path, skip_bad_records=skip_bad)
    return read_groups(fmt, path, columns=columns, split=split, skip_bad=skip_bad)


__all__ = ["GROUP_FORMATS", "check_prompts", "open_groups", "read_groups", "read_jsonl_groups"]
