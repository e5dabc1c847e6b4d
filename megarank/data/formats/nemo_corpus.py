"""NeMo AutoModel's corpus-id retrieval data (``docs/guides/llm/retrieval-dataset.mdx``, "Corpus ID-Based JSON";
``nemo_automodel/components/datasets/llm/retrieval_dataset.py`` ``load_datasets``): one JSON file

    {"corpus": [{"path": "wiki_corpus"}], "data": [{"question_id": ..., "question": ..., "corpus_id": ...,
                                                    "pos_doc": [{"id": ...} or id, ...], "neg_doc": [...]}]}

whose documents are ids resolved through corpus folders (a relative path is relative to the JSON file). A corpus
folder holds ``merlin_metadata.json`` (``{"class": "TextQADataset", "corpus_id": ...}``) and the ``train`` split
that ``datasets.load_dataset(folder)`` finds, with ``id`` and ``text`` columns (Parquet or JSON Lines files).

Every record is checked when the file is read (fields, types, a non-empty ``pos_doc``, every id in its corpus);
its texts are looked up when a group is built. Records are named ``<file> data[i]`` (i from 0).

Training opens the file through an index (`open_nemo_corpus_groups`, megarank/data/formats/index.py): one process
reads the JSON and the corpora once, checks every record, and writes the questions and the resolved document rows
as arrays, and the corpora's texts as an Arrow copy; every rank then reads a group's texts when it is drawn,
instead of parsing the JSON and holding an id -> row dictionary of every corpus. The builder streams: the corpora
are decoded `_READ_ROWS` rows at a time, their texts written to the copy as they come, and the records are decoded
one at a time from the file's text (`_decode_top`), so it holds the JSON's text and the id -> row dictionaries,
never the records' Python objects or the corpora's texts.
"""

from __future__ import annotations

import json
import os
import re
from array import array
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import DataError, data_error, where
from ..readers import json_object, text_lines
from .arrow import COPY_BATCH_ROWS, arrow_copy, arrow_copy_problem, copy_row, write_copy
from .index import bad_fields, file_stamp, open_index, recorded_bad
from .jsonl import report_skipped
from .records import query_text, record_error

REQUIRED = ("question_id", "question", "corpus_id", "pos_doc", "neg_doc")
_DATA_SUFFIXES = (".parquet", ".jsonl", ".json")
_SPLIT_WORDS = {"train": {"train", "training"}, "other": {"validation", "valid", "dev", "val", "test", "testing",
                                                          "eval", "evaluation"}}
_NON_WORD = re.compile(r"[-._ 0-9/]+")
_READ_ROWS = 65536  # corpus rows decoded at a time


class Corpus:
    """One corpus folder's ``train`` split: its id -> row dictionary and (when read whole, by the eager reader) its
    texts. ``first_row``: its first row in the index's Arrow copy (the builder's; 0 otherwise)."""

    def __init__(self, folder: Path, corpus_id: str, rows: dict[str, int], texts: pa.ChunkedArray | None = None,
                 first_row: int = 0):
        self.folder = folder
        self.corpus_id = corpus_id
        self.rows = rows
        self.texts = texts
        self.first_row = first_row

    def text(self, doc_id: str) -> str:
        return self.texts[self.rows[doc_id]].as_py()


def train_split_files(folder: Path) -> list[Path]:
    """The data files of the ``train`` split as ``datasets.load_dataset(folder)`` finds them: those with the word
    train (or training) in their path (``train.parquet``, ``data/train-00000-of-00001.parquet``, ``train/x.jsonl``);
    every data file when no file names a split."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _DATA_SUFFIXES)
    words = {p: set(_NON_WORD.split(str(p.relative_to(folder).with_suffix("")))) for p in files}
    train = [p for p in files if words[p] & _SPLIT_WORDS["train"]]
    if not train and not any(w & _SPLIT_WORDS["other"] for w in words.values()):
        train = files
    if not train:
        raise DataError(f"{folder}: has no train split (a .parquet or .jsonl file with 'train' in its name)")
    return train


Batches = Iterator[tuple[pa.Array, pa.Array]]  # (ids, texts) of consecutive rows, both strings


def _jsonl_batches(path: Path) -> Batches:
    ids, texts = [], []
    for number, line in text_lines(path):
        obj = json_object(path, number, line)
        doc_id, text = obj.get("id"), obj.get("text")
        if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or not isinstance(text, str):
            raise data_error(path, number, "a corpus document needs an 'id' (string or integer) and a string 'text'")
        ids.append(str(doc_id))
        texts.append(text)
        if len(ids) == _READ_ROWS:
            yield pa.array(ids, pa.string()), pa.array(texts, pa.string())
            ids, texts = [], []
    if ids:
        yield pa.array(ids, pa.string()), pa.array(texts, pa.string())


def _parquet_batches(path: Path) -> Batches:
    try:
        pf = pq.ParquetFile(path, memory_map=True)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: is not a readable Parquet file ({e})") from None
    schema = pf.schema_arrow
    missing = [c for c in ("id", "text") if c not in schema.names]
    if missing:
        raise DataError(f"{path}: has no column '{missing[0]}'; a corpus needs 'id' and 'text'")
    text_type, id_type = schema.field("text").type, schema.field("id").type
    if not pa.types.is_string(text_type) and not pa.types.is_large_string(text_type):
        raise DataError(f"{path}: column 'text' is {text_type}, expected a string")
    if not (pa.types.is_string(id_type) or pa.types.is_large_string(id_type) or pa.types.is_integer(id_type)):
        raise DataError(f"{path}: column 'id' is {id_type}, expected strings or integers")
    try:
        for batch in pf.iter_batches(batch_size=_READ_ROWS, columns=["id", "text"]):
            yield batch.column("id").cast(pa.string()), batch.column("text").cast(pa.string())
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: is not a readable Parquet file ({e})") from None


def _corpus_id(folder: Path) -> str:
    """A corpus folder's ``corpus_id``, from its metadata (class TextQADataset)."""
    meta_path = folder / "merlin_metadata.json"
    if not meta_path.is_file():
        raise DataError(f"{folder}: has no merlin_metadata.json (a NeMo AutoModel corpus folder needs one)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{meta_path}: is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("corpus_id"), str):
        raise DataError(f"{meta_path}: needs a string 'corpus_id'")
    if meta.get("class") != "TextQADataset":
        raise DataError(f"{meta_path}: class {meta.get('class')!r} is not TextQADataset, the text corpus class "
                        "(image corpora are not read)")
    return meta["corpus_id"]


def _read_corpus(folder: Path, each: Callable[[pa.Array], None]) -> dict[str, int]:
    """A corpus folder's train split read batch by batch: its id -> row dictionary, every row checked (a null id
    or text, a duplicate id naming both rows: the first bad row in row order), each batch's texts passed to
    `each` in row order."""
    rows: dict[str, int] = {}
    for file in train_split_files(folder):
        for ids, texts in (_parquet_batches(file) if file.suffix == ".parquet" else _jsonl_batches(file)):
            start = len(rows)
            null = pc.index(pc.or_kleene(ids.is_null(), texts.is_null()), True).as_py() \
                if ids.null_count or texts.null_count else len(ids)
            for row, doc_id in enumerate(ids.slice(0, null).to_pylist(), start):
                if rows.setdefault(doc_id, row) != row:
                    raise DataError(f"{folder}: document id '{doc_id}' appears twice in the train split (rows "
                                    f"{rows[doc_id]} and {row})")
            if null < len(ids):
                raise DataError(f"{folder}: row {start + null} of the train split has a null 'id' or 'text'")
            each(texts)
    return rows


def load_corpus(folder: Path) -> Corpus:
    """A corpus folder: its metadata (class TextQADataset, corpus_id) and its train split's ids and texts."""
    corpus_id = _corpus_id(folder)
    texts: list[pa.Array] = []
    rows = _read_corpus(folder, texts.append)
    return Corpus(folder, corpus_id, rows, pa.chunked_array(texts, pa.string()))


class NemoCorpusGroups(Sequence):
    """The records of a corpus-id file as group dicts ``{"query", "pos", "neg", "at"}``, texts looked up on
    access. ``records``: ``(at, question, corpus_id, pos ids, neg ids)``."""

    def __init__(self, records: list[tuple[str, str, str, list[str], list[str]]], corpora: dict[str, Corpus]):
        self.records = records
        self.corpora = corpora

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        at, question, corpus_id, pos, neg = self.records[index]
        corpus = self.corpora[corpus_id]
        return {"query": question, "pos": [corpus.text(d) for d in pos], "neg": [corpus.text(d) for d in neg],
                "at": at}


def _corpus_paths(path: Path, value: Any) -> list[Path]:
    entries = [value] if isinstance(value, dict) else value
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("path"), str)
                                                for e in entries):
        raise DataError(f"{path}: 'corpus' must be a list of objects with a string 'path'")
    return [Path(os.path.normpath(path.parent / e["path"])) for e in entries]


def _load_corpora(path: Path, top: dict, load: Callable[[Path], Corpus] = load_corpus) -> dict[str, Corpus]:
    """The file's corpora by corpus_id, each folder read once (by `load`), in the file's order."""
    corpora: dict[str, Corpus] = {}
    for folder in _corpus_paths(path, top["corpus"]):
        if any(c.folder == folder for c in corpora.values()):
            continue
        corpus = load(folder)
        other = corpora.setdefault(corpus.corpus_id, corpus)
        if other.folder != folder:
            raise DataError(f"{path}: corpus_id '{corpus.corpus_id}' names two corpora ({other.folder} and {folder})")
    return corpora


def _doc_ids(at: str, key: str, docs: Any, corpus: Corpus) -> list[str]:
    """The ids of a record's ``pos_doc`` / ``neg_doc`` (``{"id": x}`` or a bare id), each in the corpus."""
    if not isinstance(docs, list):
        raise record_error(at, f"'{key}' must be a list of ids, got {type(docs).__name__}")
    ids = []
    for i, doc in enumerate(docs):
        doc_id = doc.get("id") if isinstance(doc, dict) else doc
        if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
            raise record_error(at, f"{key}[{i}] must be an id (a string, an integer or {{\"id\": ...}}), got "
                               f"{json.dumps(doc)[:60]}")
        if str(doc_id) not in corpus.rows:
            raise record_error(at, f"{key}[{i}] id '{doc_id}' is not in corpus '{corpus.corpus_id}' ({corpus.folder})")
        ids.append(str(doc_id))
    return ids


def _record(at: str, item: Any, corpora: dict[str, Corpus]) -> tuple[str, str, str, list[str], list[str]]:
    if not isinstance(item, dict):
        raise record_error(at, f"expected a JSON object, got {type(item).__name__}")
    missing = [k for k in REQUIRED if k not in item]
    if missing:
        raise record_error(at, f"missing field '{missing[0]}'")
    question = query_text(at, "question", item["question"])
    corpus = corpora.get(str(item["corpus_id"]))
    if corpus is None:
        raise record_error(at, f"corpus_id '{item['corpus_id']}' is not one of the file's corpora "
                           f"({', '.join(sorted(corpora))})")
    pos = _doc_ids(at, "pos_doc", item["pos_doc"], corpus)
    if not pos:
        raise record_error(at, "'pos_doc' is empty")
    return at, question, corpus.corpus_id, pos, _doc_ids(at, "neg_doc", item["neg_doc"], corpus)


class _Records:
    """The 'data' list of a corpus-id file, decoded one record at a time from the file's text (200k records of 5
    ids: 50 MB of text, 0.36 GiB of Python objects when decoded whole). ``spans``: each record's (start, end) in the
    text, found by `_decode_top`'s pass over the whole document."""

    def __init__(self, text: str, spans: array):
        self.text = text
        self.spans = spans

    def __len__(self) -> int:
        return len(self.spans) // 2

    def __iter__(self) -> Iterator[Any]:
        decode = _DECODER.raw_decode
        for k in range(len(self)):
            yield decode(self.text, self.spans[2 * k])[0]


_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")


class _NotStreamable(Exception):
    """The document is not ``{"key": value, ...}`` as `_decode_top` reads it: json.loads decides (and names the
    error)."""


def _decode_top(text: str) -> Any:
    """``json.loads(text)``, except that the value of a top-level object's "data" key, when it is a list, becomes
    a `_Records` (each record checked by decoding it once here, kept as its span). Any document this pass does not
    read as an object of that shape goes to json.loads, so the errors and values are json.loads's (the last of a
    repeated key wins, as there)."""
    try:
        return _scan_object(text)
    except _NotStreamable:
        return json.loads(text)


def _value(text: str, at: int) -> tuple[Any, int]:
    """The JSON value at `at` and where it ends."""
    try:
        return _DECODER.raw_decode(text, at)
    except json.JSONDecodeError:
        raise _NotStreamable from None


def _after_item(text: str, at: int, close: str) -> tuple[int, bool]:
    """Past what follows an item of a list or object: its ',' (and the space after), or the `close` that ends it
    (then True)."""
    at = _SPACE.match(text, at).end()
    if text[at:at + 1] == close:
        return at + 1, True
    if text[at:at + 1] != ",":
        raise _NotStreamable
    return _SPACE.match(text, at + 1).end(), False


def _scan_object(text: str) -> dict:
    space = _SPACE.match
    at = space(text, 0).end()
    if text[at:at + 1] != "{":
        raise _NotStreamable
    top: dict = {}
    at = space(text, at + 1).end()
    closed = text[at:at + 1] == "}"
    at += closed
    while not closed:
        if text[at:at + 1] != '"':
            raise _NotStreamable
        key, at = _value(text, at)
        at = space(text, at).end()
        if text[at:at + 1] != ":":
            raise _NotStreamable
        at = space(text, at + 1).end()
        if key == "data" and text[at:at + 1] == "[":
            spans = array("q")
            at = space(text, at + 1).end()
            done = text[at:at + 1] == "]"
            at += done
            while not done:
                _, end = _value(text, at)
                spans.extend((at, end))
                at, done = _after_item(text, end, "]")
            top[key] = _Records(text, spans)
        else:
            top[key], at = _value(text, at)
        at, closed = _after_item(text, at, "}")
    if space(text, at).end() != len(text):
        raise _NotStreamable  # json.loads: "Extra data"
    return top


def _read_top(path: Path, folders: list[Path] | None = None) -> dict:
    """The corpus-id JSON file's object (checked to hold 'corpus' and a 'data' list, a `_Records`). `folders`, if
    given, receives the corpus folders it names (before they are read)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        top = _decode_top(path.read_text(encoding="utf-8-sig"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: is not valid JSON ({e}); the corpus-id form is one JSON object with 'corpus' "
                        "and 'data'") from None
    if not isinstance(top, dict) or "corpus" not in top or not isinstance(top.get("data"), (list, _Records)):
        raise DataError(f"{path}: expected one JSON object with 'corpus' and a 'data' list")
    if folders is not None:
        folders.extend(_corpus_paths(path, top["corpus"]))
    return top


def _records(path: Path, top: dict, corpora: dict[str, Corpus], skip_bad_records: bool, bad: list[str]
             ) -> Iterator[tuple[int, tuple[str, str, str, list[str], list[str]]]]:
    """``(position in 'data', record)`` of each good record; with `skip_bad_records` the bad records' errors go to
    `bad`, else the first is raised."""
    for i, item in enumerate(top["data"]):
        try:
            record = _record(f"{where(path)} data[{i}]", item, corpora)
        except DataError as e:
            if not skip_bad_records:
                raise
            bad.append(str(e))
            continue
        yield i, record


def _read_records(path: Path, skip_bad_records: bool
                  ) -> tuple[list[tuple[str, str, str, list[str], list[str]]], dict[str, Corpus], list[str]]:
    """The good records of a corpus-id JSON file, its corpora (read whole) and the bad records' errors."""
    top = _read_top(path)
    corpora = _load_corpora(path, top)
    bad: list[str] = []
    records = [record for _, record in _records(path, top, corpora, skip_bad_records, bad)]
    return records, corpora, bad


def read_nemo_corpus_groups(path: str | os.PathLike, skip_bad_records: bool = False
                            ) -> tuple[NemoCorpusGroups, int]:
    """The groups of a corpus-id JSON file: ``(groups, n_skipped)``; with `skip_bad_records`, bad records are
    counted and skipped (a bad file or corpus is always an error)."""
    path = Path(path)
    records, corpora, bad = _read_records(path, skip_bad_records)
    groups = NemoCorpusGroups(records, corpora)
    return groups, report_skipped(path, groups, bad, "records")


# ----------------------------------------------------------------------------------------------- through an index


class IndexedNemoCorpusGroups(Sequence):
    """The groups of a corpus-id file from its index: the same dicts as `NemoCorpusGroups`. The questions and
    each record's document rows are memory-mapped arrays; a document's text is read from the corpora's Arrow copy
    (its 64-row record batch, ``pread``, as `arrow.IndexedArrowGroups` reads a row)."""

    def __init__(self, path: Path, index, reader: pa.ipc.RecordBatchFileReader):
        self.path = path
        self.index = index
        self.reader = reader
        self.records = index["records"]  # the position of each good record in the file's 'data' list
        self.question_start = index["question_start"]
        self.questions = index["questions"]
        self.pos_start, self.pos_rows = index["pos_start"], index["pos_rows"]
        self.neg_start, self.neg_rows = index["neg_start"], index["neg_rows"]
        self.batch_start = index["batch_start"]

    def __len__(self) -> int:
        return len(self.records)

    def _texts(self, rows: np.ndarray) -> list[str]:
        texts = []
        for row in rows.tolist():
            batch, at = copy_row(self.reader, self.batch_start, row)
            texts.append(batch.column(0)[at].as_py())
        return texts

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"group {index} of {len(self)}")
        index %= len(self)
        q0, q1 = int(self.question_start[index]), int(self.question_start[index + 1])
        return {"query": bytes(self.questions[q0:q1]).decode("utf-8", "surrogatepass"),
                "pos": self._texts(self.pos_rows[self.pos_start[index]:self.pos_start[index + 1]]),
                "neg": self._texts(self.neg_rows[self.neg_start[index]:self.neg_start[index + 1]]),
                "at": f"{where(self.path)} data[{int(self.records[index])}]"}

    def group_counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(positives, negatives, has teacher scores) of every good record, from the index (no teacher scores in
        this format)."""
        return (np.diff(self.pos_start), np.diff(self.neg_start), np.zeros(len(self), dtype=np.bool_))

    def skipped(self) -> int:
        return report_skipped(self.path, self, recorded_bad(self.index), "records")


def _folder_stamps(folders: list[Path]) -> dict[str, list[dict]]:
    """What identifies the corpus folders' content: the stamp (`index.file_stamp`) of every file under each that
    the reader looks at (the metadata and every .parquet / .jsonl / .json file: a new one may change the train
    split), so that other files in the folder (logs, megarank's own index) do not force a rebuild."""
    stamps = {}
    for folder in folders:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _DATA_SUFFIXES) \
            if folder.is_dir() else []
        stamps[str(folder)] = [file_stamp(f) for f in files]
    return stamps


class _TextCopy:
    """The corpora's texts written to the index's Arrow copy as they are read (`arrow.write_copy`); ``rows``: the
    copy's next row, ``batch_start``: the first row of each record batch."""

    SCHEMA = pa.schema([("text", pa.string())])

    def __init__(self, writer: pa.ipc.RecordBatchFileWriter):
        self.writer = writer
        self.rows = 0
        self.batch_start = array("q")

    def add(self, texts: pa.Array) -> None:
        self.rows = write_copy(self.writer, pa.record_batch([texts], schema=self.SCHEMA), self.rows, self.batch_start)


def _build_index(path: Path, skip_bad_records: bool):
    def build(index_path: Path):
        folders: list[Path] = []
        arrow = arrow_copy(index_path)
        tmp = arrow.with_name(f".{arrow.name}.{os.getpid()}.tmp")
        questions, question_start = bytearray(), array("q", [0])
        positions, pos_start, pos_rows, neg_start, neg_rows = array("q"), array("q", [0]), array("q"), \
            array("q", [0]), array("q")
        bad: list[str] = []
        try:
            try:
                top = _read_top(path, folders)
                with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, _TextCopy.SCHEMA) as writer:
                    copy = _TextCopy(writer)

                    def stream(folder: Path) -> Corpus:  # the texts go to the copy, only the ids stay
                        corpus_id, first_row = _corpus_id(folder), copy.rows
                        return Corpus(folder, corpus_id, _read_corpus(folder, copy.add), first_row=first_row)

                    corpora = _load_corpora(path, top, stream)
                for i, (_, question, corpus_id, pos, neg) in _records(path, top, corpora, skip_bad_records, bad):
                    positions.append(i)
                    questions += question.encode("utf-8", "surrogatepass")  # JSON may hold a lone surrogate
                    question_start.append(len(questions))
                    corpus = corpora[corpus_id]
                    pos_rows.extend(corpus.first_row + corpus.rows[d] for d in pos)
                    pos_start.append(len(pos_rows))
                    neg_rows.extend(corpus.first_row + corpus.rows[d] for d in neg)
                    neg_start.append(len(neg_rows))
                if not positions:
                    report_skipped(path, positions, bad, "records")  # the eager reader's error
            except DataError as e:  # recorded with the corpus folders it was read against: fixing one rebuilds
                e.index_fields = {"corpus_folders": _folder_stamps(folders)}
                raise
            os.replace(tmp, arrow)
        finally:
            tmp.unlink(missing_ok=True)
        as_int64 = lambda a: np.frombuffer(a, dtype=np.int64).copy()  # noqa: E731
        return {**bad_fields(bad), "arrow_size": arrow.stat().st_size,
                "corpus_folders": _folder_stamps(folders)}, {
            "records": as_int64(positions), "questions": np.frombuffer(bytes(questions), dtype=np.uint8),
            "question_start": as_int64(question_start), "pos_start": as_int64(pos_start),
            "pos_rows": as_int64(pos_rows), "neg_start": as_int64(neg_start), "neg_rows": as_int64(neg_rows),
            "batch_start": as_int64(copy.batch_start)}
    return build


def _index_problem(index) -> str:
    """Why an index's Arrow copy or the corpus folders it was built from no longer fit ("" when they do): the
    folders are named inside the JSON, so the index records their files' stamps and this compares them."""
    was = index.header.get("corpus_folders", {})
    now = _folder_stamps([Path(folder) for folder in was])
    for folder in was:
        if now[folder] != was[folder]:
            changed = sorted({f["path"] for f in now[folder]} ^ {f["path"] for f in was[folder]}) or sorted(
                f["path"] for f in now[folder] if f not in was[folder])
            return f"corpus folder {folder} changed since ({', '.join(changed[:3]) or 'its files'})"
    return arrow_copy_problem(index)


def open_nemo_corpus_groups(path: str | os.PathLike, skip_bad_records: bool = False
                            ) -> tuple[IndexedNemoCorpusGroups, int]:
    """`read_nemo_corpus_groups` through an index (megarank/data/formats/index.py): the same groups and errors,
    the JSON and the corpora read once; ``(groups, n_skipped)``. The index is rebuilt when the JSON file or any
    corpus file (metadata, train split) changes."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    index = open_index(path, [path], "nemo_corpus", {"skip_bad_records": skip_bad_records,
                                                      "batch_rows": COPY_BATCH_ROWS},
                       _build_index(path, skip_bad_records), usable=_index_problem)
    try:
        reader = pa.ipc.open_file(pa.OSFile(str(arrow_copy(index.path))))
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: its index's Arrow copy {arrow_copy(index.path)} cannot be read ({e}); delete "
                        f"{index.path} to rebuild it") from None
    groups = IndexedNemoCorpusGroups(path, index, reader)
    return groups, groups.skipped()
