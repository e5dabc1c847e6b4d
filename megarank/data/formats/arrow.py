"""Training groups in Arrow tables: Parquet files and Hugging Face ``datasets`` ``save_to_disk`` folders, local
paths only. One row per group: a query column (string), positive and negative columns (a list of documents, or
one document: a string or a ``{title, text}`` struct), and the optional ``pos_scores``, ``neg_scores``,
``pos_labels`` (lists of numbers). Column names are mapped from megarank's field names (``data.columns``).

Rows are fetched by index (``ArrowGroups[i]``) from the table, never held as Python objects: a ``save_to_disk``
folder's Arrow files are memory-mapped (the OS page cache is shared by every rank); Parquet is compressed, so it
is decoded once into Arrow buffers. Rows are numbered from 0 as pandas and ``datasets`` number them: per Parquet
file, and over the whole dataset (``dataset[i]``) of a ``save_to_disk`` folder.
"""

from __future__ import annotations

import bisect
import json
import os
from array import array
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pyarrow.types as pat

from ..errors import DataError
from .index import bad_fields, open_index, recorded_bad
from .jsonl import report_skipped
from .records import parse_group

FIELDS = ("query", "pos_doc", "neg_doc", "pos_scores", "neg_scores", "pos_labels")
REQUIRED = ("query", "pos_doc", "neg_doc")
_BATCH_ROWS = 4096


class ArrowGroups(Sequence):
    """The good rows of an Arrow table as group dicts (``{"query", "pos", "neg", "at"}`` + optional fields),
    built one row at a time on access. ``files``: ``(file name, first row)`` of each file in the table, for
    error messages."""

    def __init__(self, table: pa.Table, rows: np.ndarray, columns: Mapping[str, str], files: list[tuple[str, int]]):
        self.table = table
        self.rows = rows
        self.columns = dict(columns)
        self.files = files

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = int(self.rows[index])
        return self._parse(row, {name: self.table.column(name)[row].as_py() for name in self.columns.values()})

    def row_at(self, row: int) -> str:
        """``"<file> row <n>"`` of a table row (n counted in its own file)."""
        k = bisect.bisect_right([start for _, start in self.files], row) - 1
        return f"{self.files[k][0]} row {row - self.files[k][1]}"

    def _parse(self, row: int, obj: dict) -> dict:
        c = self.columns
        return parse_group(self.row_at(row), obj, c["query"], c["pos_doc"], c["neg_doc"], single_docs=True,
                           extra_names={k: c[k] for k in FIELDS[3:] if k in c})

    def checked(self, skip_bad: bool, label: str) -> tuple["ArrowGroups", int]:
        """These groups without their bad rows (``skip_bad``; their count logged against `label`) or the first bad
        row's DataError, validated batch by batch so that only one batch is ever held as Python objects."""
        good, bad = [], []
        names = list(self.columns.values())
        start = 0
        for batch in self.table.select(names).to_batches(max_chunksize=_BATCH_ROWS):
            for offset, obj in enumerate(batch.to_pylist()):
                try:
                    self._parse(start + offset, obj)
                    good.append(start + offset)
                except DataError as e:
                    if not skip_bad:
                        raise
                    bad.append(str(e))
            start += batch.num_rows
        groups = ArrowGroups(self.table, np.asarray(good, dtype=np.int64), self.columns, self.files)
        return groups, report_skipped(label, groups, bad, "rows")


def _is_text(t: pa.DataType) -> bool:
    return pat.is_string(t) or pat.is_large_string(t)


def _is_doc(t: pa.DataType) -> bool:
    if _is_text(t):
        return True
    return pat.is_struct(t) and t.get_field_index("text") >= 0 and _is_text(t.field("text").type)


def _is_list_of(t: pa.DataType, item) -> bool:
    return (pat.is_list(t) or pat.is_large_list(t)) and item(t.value_type)


def _type_problem(field_name: str, t: pa.DataType) -> str | None:
    """Why a column of type `t` cannot hold `field_name` (None if it can)."""
    if field_name == "query":
        return None if _is_text(t) else "a string"
    if field_name in ("pos_doc", "neg_doc"):
        return None if _is_doc(t) or _is_list_of(t, _is_doc) else \
            "a list of strings or of {title, text} structs (or one of them)"
    numeric = lambda v: pat.is_integer(v) or pat.is_floating(v)  # noqa: E731
    return None if _is_list_of(t, numeric) else "a list of numbers"


def column_map(schema: pa.Schema, columns: Mapping[str, str], where: str) -> dict[str, str]:
    """``{field: column}`` of the fields this table has: every required one, and each optional one whose column
    exists (a name mapped away from its default must exist). Missing columns and wrong types name the file, the
    column and the ``data.columns`` key."""
    found = {}
    for field_name in FIELDS:
        name = columns.get(field_name, field_name)
        if name not in schema.names:
            if field_name in REQUIRED or name != field_name:
                raise DataError(f"{where}: has no column '{name}' (data.columns.{field_name}); its columns are "
                                f"{', '.join(schema.names)}")
            continue
        if problem := _type_problem(field_name, schema.field(name).type):
            raise DataError(f"{where}: column '{name}' (data.columns.{field_name}) is {schema.field(name).type}, "
                            f"expected {problem}")
        found[field_name] = name
    return found


def _concat(tables: list[tuple[str, pa.Table]], columns: Mapping[str, str]) -> ArrowGroups:
    """One table of the files' rows (each checked for the mapped columns), with each file's first row."""
    files, parts, start = [], [], 0
    mapped = None
    for name, table in tables:
        found = column_map(table.schema, columns, name)
        if mapped is not None and found != mapped:
            raise DataError(f"{name}: has columns {sorted(found.values())} but {files[0][0]} has "
                            f"{sorted(mapped.values())}; the files of one training set need the same columns")
        mapped = found
        parts.append(table.select(list(found.values())))
        files.append((name, start))
        start += table.num_rows
    try:
        table = pa.concat_tables(parts, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataError(f"{files[-1][0]}: its column types differ from {files[0][0]}'s ({e})") from None
    return ArrowGroups(table, np.arange(table.num_rows, dtype=np.int64), mapped, files)


def parquet_files(path: Path) -> list[Path]:
    """A Parquet file, or the ``*.parquet`` files under a folder (sorted by path)."""
    if path.is_dir():
        found = sorted(path.rglob("*.parquet"))
        if not found:
            raise DataError(f"{path}: the folder holds no .parquet file")
        return found
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return [path]


def read_parquet_groups(path: str | os.PathLike, columns: Mapping[str, str],
                        skip_bad_rows: bool = False) -> tuple[ArrowGroups, int]:
    """The groups of a Parquet file or a folder of them: ``(groups, n_skipped)``."""
    tables = []
    for file in parquet_files(Path(path)):
        try:
            tables.append((str(file), pq.read_table(file, memory_map=True)))
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{file}: is not a readable Parquet file ({e})") from None
    return _concat(tables, columns).checked(skip_bad_rows, str(path))


def dataset_folder(path: Path, split: str) -> Path:
    """The ``save_to_disk`` folder of one dataset: `path`, or its `split` when `path` holds a ``DatasetDict``."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise DataError(f"{path}: the DatasetDict has no split '{split}' (data.train_split); its splits are "
                            f"{', '.join(splits) or 'none'}")
        path = path / split
    if not (path / "state.json").is_file():
        raise DataError(f"{path}: is not a datasets save_to_disk folder (no state.json or dataset_dict.json)")
    return path


def arrow_files(folder: Path) -> list[Path]:
    """The Arrow files a ``save_to_disk`` folder's ``state.json`` lists, in order."""
    try:
        state = json.loads((folder / "state.json").read_text())
        files = [folder / entry["filename"] for entry in state["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{folder / 'state.json'}: is not a datasets state file ({type(e).__name__}: {e})") from None
    if not files:
        raise DataError(f"{folder / 'state.json'}: lists no data files")
    return files


def _mapped_stream(file: Path) -> pa.Table:
    """An Arrow IPC stream file read zero-copy from a memory map (what ``datasets`` does)."""
    try:
        return pa.ipc.open_stream(pa.memory_map(str(file))).read_all()
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{file}: is not a readable Arrow stream file ({e})") from None


def read_hf_disk_groups(path: str | os.PathLike, columns: Mapping[str, str], split: str = "train",
                        skip_bad_rows: bool = False) -> tuple[ArrowGroups, int]:
    """The groups of a ``Dataset.save_to_disk`` folder (or the `split` of a ``DatasetDict`` one):
    ``(groups, n_skipped)``."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: is not a folder (a datasets save_to_disk folder is expected)")
    folder = dataset_folder(path, split)
    groups = _concat([(str(f), _mapped_stream(f)) for f in arrow_files(folder)], columns)
    groups.files = [(str(folder), 0)]  # rows named as the dataset numbers them (dataset[i]), not per shard
    return groups.checked(skip_bad_rows, str(path))


COPY_BATCH_ROWS = 64  # rows per record batch of an index's Arrow copy: what one drawn row reads


class IndexedArrowGroups(ArrowGroups):
    """`ArrowGroups` on a Parquet source's Arrow copy, with the per-row counts its index holds. A drawn row reads
    its record batch of `COPY_BATCH_ROWS` rows (about 64 x the row's bytes) with ``pread`` through Arrow's file
    reader, zero-copy from that buffer. The copy is not memory-mapped: with a page cache of large folios (up to
    2 MiB each, Linux 6.x), every row touched through a map counts about 1 MiB in the rank's RSS, so that a long
    run would show the whole copy in the RSS of every rank (benchmarks/RESULTS.md, "Training groups at scale")."""

    def __init__(self, reader: pa.ipc.RecordBatchFileReader, index, columns: Mapping[str, str],
                 files: list[tuple[str, int]]):
        super().__init__(None, index["rows"], columns, files)
        self.reader = reader
        self.index = index
        self.batch_start = index["batch_start"]

    def __getitem__(self, index: int) -> dict:
        row = int(self.rows[index])
        batch, at = copy_row(self.reader, self.batch_start, row)
        return self._parse(row, {name: batch.column(name)[at].as_py() for name in self.columns.values()})

    def group_counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(positives, negatives, has teacher scores) of every good row, from the index."""
        return self.index["n_pos"], self.index["n_neg"], self.index["teacher"]

    def skipped(self, label: str) -> int:
        return report_skipped(label, self, recorded_bad(self.index), "rows")


def copy_row(reader: pa.ipc.RecordBatchFileReader, batch_start: np.ndarray, row: int) -> tuple[pa.RecordBatch, int]:
    """Row ``row`` of an index's Arrow copy: its record batch (read with ``pread``) and its place in it.
    ``batch_start``: the first row of each batch."""
    k = int(np.searchsorted(batch_start, row, side="right")) - 1
    return reader.get_batch(k), row - int(batch_start[k])


def write_copy(writer: pa.ipc.RecordBatchFileWriter, batch: pa.RecordBatch, start: int, batch_start: array) -> int:
    """`batch`, whose first row is row `start` of an index's Arrow copy, written to the copy in record batches of at
    most `COPY_BATCH_ROWS` rows, each one's first row appended to `batch_start`; the copy's next row."""
    for k in range(0, batch.num_rows, COPY_BATCH_ROWS):
        batch_start.append(start + k)
        writer.write_batch(batch.slice(k, COPY_BATCH_ROWS))
    return start + batch.num_rows


def arrow_copy(index_path: Path) -> Path:
    """The Arrow copy beside an index (Parquet, ``datasets`` and corpus-id sources)."""
    return Path(f"{index_path}.arrow")


def _parquet_sources(files: list[Path], columns: Mapping[str, str]):
    """``(mapped columns, [(file name, schema, batches(names)), ...])`` of Parquet files, columns checked."""
    opened, mapped = [], None
    for file in files:
        try:
            pf = pq.ParquetFile(file, memory_map=True)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{file}: is not a readable Parquet file ({e})") from None
        found = column_map(pf.schema_arrow, columns, str(file))
        if mapped is not None and found != mapped:
            raise DataError(f"{file}: has columns {sorted(found.values())} but {files[0]} has "
                            f"{sorted(mapped.values())}; the files of one training set need the same columns")
        mapped = found
        opened.append((str(file), pf.schema_arrow,
                       lambda names, pf=pf: pf.iter_batches(batch_size=_BATCH_ROWS, columns=names)))
    return mapped, opened


def _hf_disk_sources(files: list[Path], columns: Mapping[str, str]):
    """The same for the Arrow stream files of a ``save_to_disk`` folder (memory-mapped while the index is built)."""
    opened, mapped = [], None
    for file in files:
        table = _mapped_stream(file)
        found = column_map(table.schema, columns, str(file))
        if mapped is not None and found != mapped:
            raise DataError(f"{file}: has columns {sorted(found.values())} but {files[0]} has "
                            f"{sorted(mapped.values())}; the files of one training set need the same columns")
        mapped = found
        opened.append((str(file), table.schema,
                       lambda names, table=table: table.select(names).to_batches(max_chunksize=_BATCH_ROWS)))
    return mapped, opened


def _build_copy(sources, columns: Mapping[str, str], files: list[Path], skip_bad: bool, label: str,
                rows_named_by: str | None = None):
    """The index builder of an Arrow-backed source (`sources`: `_parquet_sources` or `_hf_disk_sources`): its rows
    decoded one batch at a time into an uncompressed Arrow file beside the index, in record batches of
    `COPY_BATCH_ROWS` rows, each row checked as `ArrowGroups.checked` checks it. Rows are named per file, or
    over the whole dataset as `rows_named_by` (a ``save_to_disk`` folder)."""
    def build(index_path: Path):
        mapped, opened = sources(files, columns)
        names = list(mapped.values())
        try:
            schema = pa.unify_schemas([pa.schema([sch.field(n) for n in names]) for _, sch, _ in opened],
                                      promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise DataError(f"{opened[-1][0]}: its column types differ from {opened[0][0]}'s ({e})") from None
        arrow = arrow_copy(index_path)
        tmp = arrow.with_name(f".{arrow.name}.{os.getpid()}.tmp")
        groups = ArrowGroups(None, np.zeros(0, np.int64), mapped, [(rows_named_by, 0)] if rows_named_by else [])
        good, n_pos, n_neg, teacher, bad, batch_starts = (array("q") for _ in range(6))
        bad = []
        start = 0
        try:
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
                for name, _, batches in opened:
                    if not rows_named_by:
                        groups.files.append((name, start))
                    try:
                        for batch in batches(names):
                            batch = batch.select(names).cast(schema)
                            for offset, obj in enumerate(batch.to_pylist()):
                                try:
                                    group = groups._parse(start + offset, obj)
                                except DataError as e:
                                    if not skip_bad:
                                        raise
                                    bad.append(str(e))
                                    continue
                                good.append(start + offset)
                                n_pos.append(len(group["pos"]))
                                n_neg.append(len(group["neg"]))
                                teacher.append("pos_scores" in group)
                            start = write_copy(writer, batch, start, batch_starts)
                    except (OSError, pa.ArrowException) as e:
                        raise DataError(f"{name}: cannot be read ({e})") from None
            if not good:
                report_skipped(label, good, bad, "rows")
            os.replace(tmp, arrow)
        finally:
            tmp.unlink(missing_ok=True)
        as_int64 = lambda a: np.frombuffer(a, dtype=np.int64).copy()  # noqa: E731
        return {**bad_fields(bad), "tables": groups.files, "columns": mapped,
                "arrow_size": arrow.stat().st_size}, {
            "rows": as_int64(good), "n_pos": as_int64(n_pos), "n_neg": as_int64(n_neg),
            "teacher": as_int64(teacher).astype(np.bool_), "batch_start": as_int64(batch_starts)}
    return build


def arrow_copy_problem(index) -> str:
    """Why an index's Arrow copy cannot be used ("" when it can, or when the index recorded an error)."""
    if index.header.get("error"):  # a recorded error has no copy: it stands until the files change
        return ""
    arrow = arrow_copy(index.path)
    try:
        size = arrow.stat().st_size
    except OSError:
        return f"its Arrow copy {arrow} is missing"
    return "" if size == index.header.get("arrow_size") else f"its Arrow copy {arrow} has another size"


def _open_copy(path, files: list[Path], kind: str, columns: Mapping[str, str], skip_bad: bool, sources,
               rows_named_by: str | None = None) -> tuple[IndexedArrowGroups, int]:
    named = {field_name: columns.get(field_name, field_name) for field_name in FIELDS}  # {} and the defaults alike
    index = open_index(path, files, kind, {"columns": named, "skip_bad_rows": skip_bad,
                                           "batch_rows": COPY_BATCH_ROWS},
                       _build_copy(sources, columns, files, skip_bad, str(path), rows_named_by),
                       usable=arrow_copy_problem)
    try:
        reader = pa.ipc.open_file(pa.OSFile(str(arrow_copy(index.path))))
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: its index's Arrow copy {arrow_copy(index.path)} cannot be read ({e}); delete "
                        f"{index.path} to rebuild it") from None
    groups = IndexedArrowGroups(reader, index, index.header["columns"], [tuple(f) for f in index.header["tables"]])
    return groups, groups.skipped(str(path))


def open_parquet_groups(path: str | os.PathLike, columns: Mapping[str, str],
                        skip_bad_rows: bool = False) -> tuple[IndexedArrowGroups, int]:
    """`read_parquet_groups` through an index (megarank/data/formats/index.py): the rows are decoded once into an
    uncompressed Arrow file beside the index, from which a drawn row's 64-row batch is read; ``(groups,
    n_skipped)``."""
    return _open_copy(path, parquet_files(Path(path)), "parquet", columns, skip_bad_rows, _parquet_sources)


def open_hf_disk_groups(path: str | os.PathLike, columns: Mapping[str, str], split: str = "train",
                        skip_bad_rows: bool = False) -> tuple[IndexedArrowGroups, int]:
    """`read_hf_disk_groups` through an index, as `open_parquet_groups`: the rows are checked once (not on every
    rank at every start) and copied in 64-row batches; ``(groups, n_skipped)``."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: is not a folder (a datasets save_to_disk folder is expected)")
    folder = dataset_folder(path, split)
    return _open_copy(path, arrow_files(folder), "hf_disk", columns, skip_bad_rows, _hf_disk_sources,
                      rows_named_by=str(folder))
