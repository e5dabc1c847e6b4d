"""Readers for BEIR collections (corpus, queries, qrels, first-stage runs) and the text-file helpers every reader
uses (training groups files are read by `megarank.data.formats`).

Every malformed line raises DataError naming the file and its 1-based line.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import DataError, data_error, where
from .template import doc_to_text

class Run(dict):
    """``{qid: [docid, ...]}`` in rank order; `path` names the run file for error messages."""

    def __init__(self, *args, path: str | os.PathLike = "<run>", **kwargs):
        super().__init__(*args, **kwargs)
        self.path = os.fspath(path)

    def where(self, qid: str, docid: str | None = None) -> str:
        """``"<path> line N"`` of the row of (qid, docid), or of qid's first row when docid is None.

        Line numbers are not kept in memory (a large run has tens of millions of rows): the file is scanned
        again, which only happens on the way to an error message.
        """
        try:
            for number, row_qid, row_docid, _, _ in iter_run_rows(self.path):
                if row_qid == qid and (docid is None or row_docid == docid):
                    return where(self.path, number)
        except DataError:
            pass
        return self.path


@dataclass
class BeirData:
    """A BEIR collection for one split: texts by id and graded judgements."""

    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    qrels_path: str = field(default="<qrels>", repr=False)


def _decode(path: Path, number: int, raw: bytes) -> str:
    """One line as text; bytes that are not UTF-8 raise a DataError naming the line and the byte's column."""
    try:
        # utf-8-sig on line 1: a byte-order mark written by some editors is not part of the first JSON value.
        return raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise data_error(path, number, f"is not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                         "re-encode the file as UTF-8") from None


def _check_readable(path: Path) -> None:
    if path.is_dir():
        raise DataError(f"{path}: is a folder, expected a file")
    if not path.is_file():
        raise DataError(f"{path}: file not found")


def text_lines(path: Path, bad: list[str] | None = None) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its end) for the non-blank lines of a UTF-8 text file.

    Lines are decoded one at a time so that a non-UTF-8 byte is reported with its line; with a `bad` list
    such a line is recorded there and skipped instead of raising.
    """
    for number, _, _, line in located_text_lines(path, bad):
        yield number, line


def located_text_lines(path: Path, bad: list[str] | None = None) -> Iterator[tuple[int, int, int, str]]:
    """`text_lines` with where each line is: (number, byte offset, length in bytes with its end, line)."""
    _check_readable(path)
    try:
        with open(path, "rb") as f:
            offset = 0
            for number, raw in enumerate(f, start=1):
                start, offset = offset, offset + len(raw)
                try:
                    line = _decode(path, number, raw)
                except DataError as e:
                    if bad is None:
                        raise
                    bad.append(str(e))
                    continue
                if line.strip():
                    yield number, start, len(raw), line.rstrip("\r\n")
    except OSError as e:  # permission denied, I/O error: one sentence naming the file
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None


def json_object(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise data_error(path, number, f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise data_error(path, number, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _read_id_texts(path: Path, kind: str, to_text) -> dict[str, str]:
    """``{_id: to_text(obj)}`` from a BEIR JSONL file (corpus or queries)."""
    out: dict[str, str] = {}
    for number, line in text_lines(path):
        obj = json_object(path, number, line)
        doc_id = obj.get("_id")
        if not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool) or str(doc_id) == "":
            raise data_error(path, number, f"{kind} needs a string '_id'")
        if not isinstance(obj.get("text"), str) or not isinstance(obj.get("title") or "", str):
            raise data_error(path, number, f"{kind} '{doc_id}' needs a string 'text'")
        if str(doc_id) in out:
            raise data_error(path, number, f"duplicate {kind} id '{doc_id}'")
        out[str(doc_id)] = to_text(obj)
    return out


def read_corpus(path: str | os.PathLike) -> dict[str, str]:
    """BEIR corpus.jsonl -> ``{doc_id: "title text"}`` (see `doc_to_text`)."""
    return _read_id_texts(Path(path), "document", doc_to_text)


def read_queries(path: str | os.PathLike) -> dict[str, str]:
    """BEIR queries.jsonl -> ``{query_id: text}``."""
    return _read_id_texts(Path(path), "query", lambda obj: obj["text"])


def _columns(line: str) -> list[str]:
    return line.split("\t") if "\t" in line else line.split()


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _iter_qrels_rows(path: Path) -> Iterator[tuple[int, str, str, int]]:
    """(line, qid, docid, score) per judgement; a first line whose score is not an integer is a header."""
    for number, line in text_lines(path):
        cols = _columns(line)
        if len(cols) not in (3, 4):
            raise data_error(path, number,
                             f"expected 3 columns (query-id corpus-id score) or 4 (TREC), got {len(cols)}")
        qid, docid, score = (cols[0], cols[1], cols[2]) if len(cols) == 3 else (cols[0], cols[2], cols[3])
        if not _is_int(score):
            if number == 1:
                continue
            raise data_error(path, number, f"relevance score '{score}' is not an integer")
        yield number, qid, docid, int(score)


def read_qrels(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """Judgements ``{qid: {docid: score}}`` from ``qid docid score`` (optional header) or TREC ``qid 0 docid rel``."""
    path = Path(path)
    qrels: dict[str, dict[str, int]] = {}
    for number, qid, docid, score in _iter_qrels_rows(path):
        if qrels.setdefault(qid, {}).setdefault(docid, score) != score:
            raise data_error(path, number, f"pair ({qid}, {docid}) is judged twice with different scores")
    return qrels


def iter_run_rows(path: str | os.PathLike) -> Iterator[tuple[int, str, str, int, float | None]]:
    """(line, qid, docid, rank, score) for each row of a run file.

    Accepts TREC lines ``qid Q0 docid rank score tag``, BEIR-candidate TSV ``query-id corpus-id rank score``
    (header optional) and MS MARCO ``qid docid rank``.
    """
    path = Path(path)
    for number, line in text_lines(path):
        cols = _columns(line)
        if len(cols) == 6:
            qid, docid, rank, score = cols[0], cols[2], cols[3], cols[4]
        elif len(cols) in (3, 4):
            qid, docid, rank, score = cols[0], cols[1], cols[2], (cols[3] if len(cols) == 4 else None)
        else:
            raise data_error(path, number,
                             f"expected 6 columns (TREC run) or 3-4 (qid docid rank [score]), got {len(cols)}")
        if not _is_int(rank):
            if number == 1:
                continue  # header line
            raise data_error(path, number, f"rank '{rank}' is not an integer")
        try:
            value = None if score is None else float(score)
        except ValueError:
            raise data_error(path, number, f"score '{score}' is not a number") from None
        yield number, qid, docid, int(rank), value


def read_run(path: str | os.PathLike) -> Run:
    """First-stage candidates ``{qid: [docid, ...]}`` ordered by rank (file order breaks equal ranks)."""
    rows: dict[str, list[tuple[int, int, str]]] = {}
    seen: set[tuple[str, str]] = set()
    for number, qid, docid, rank, _ in iter_run_rows(path):
        if (qid, docid) in seen:
            raise data_error(path, number, f"document '{docid}' appears twice for query '{qid}'")
        seen.add((qid, docid))
        rows.setdefault(qid, []).append((rank, number, docid))
    return Run({qid: [d for _, _, d in sorted(r)] for qid, r in rows.items()}, path=path)


class ScoredRun(dict):
    """``{qid: {docid: score}}`` of a scored run (a teacher's scores); `path` names the file for error messages."""

    def __init__(self, *args, path: str | os.PathLike = "<run>", **kwargs):
        super().__init__(*args, **kwargs)
        self.path = os.fspath(path)

    def score(self, qid: str, docid: str) -> float:
        """The score of (qid, docid); DataError naming the file, query and document when the run lacks it."""
        try:
            return self[qid][docid]
        except KeyError:
            raise DataError(f"{self.path}: has no score for document '{docid}' of query '{qid}' (a teacher run must "
                            "score every passage a training group can hold)") from None


def read_scored_run(path: str | os.PathLike) -> ScoredRun:
    """Scores ``{qid: {docid: score}}`` of a run whose rows all carry a finite score (TREC ``qid Q0 docid rank score
    tag`` or ``qid docid rank score``): what ``megarank rerank`` writes with a teacher. A row without a score, a
    NaN/inf score or a pair listed twice raises DataError naming the line."""
    scores: dict[str, dict[str, float]] = {}
    for number, qid, docid, _, score in iter_run_rows(path):
        if score is None:
            raise data_error(path, number, "has no score column; a teacher run needs a score on every row "
                             "(qid Q0 docid rank score tag)")
        if not math.isfinite(score):
            raise data_error(path, number, f"score {score} of document '{docid}' for query '{qid}' is not finite")
        if docid in scores.setdefault(qid, {}):
            raise data_error(path, number, f"document '{docid}' appears twice for query '{qid}'")
        scores[qid][docid] = score
    if not scores:
        raise DataError(f"{path}: no scored rows found")
    return ScoredRun(scores, path=path)


def _check_qrels_ids(qrels_path: Path, corpus: dict, queries: dict) -> None:
    """Every judged query and document must exist; the error names the qrels line."""
    for number, qid, docid, _ in _iter_qrels_rows(qrels_path):
        if qid not in queries:
            raise data_error(qrels_path, number, f"query id '{qid}' is not in queries.jsonl")
        if docid not in corpus:
            raise data_error(qrels_path, number, f"document id '{docid}' is not in corpus.jsonl")


def read_beir(folder: str | os.PathLike, split: str) -> BeirData:
    """corpus.jsonl, queries.jsonl and qrels/<split>.tsv of a BEIR folder, checked for consistency."""
    folder = Path(folder)
    corpus = read_corpus(folder / "corpus.jsonl")
    queries = read_queries(folder / "queries.jsonl")
    qrels_path = folder / "qrels" / f"{split}.tsv"
    qrels = read_qrels(qrels_path)
    if not qrels:
        raise DataError(f"{qrels_path}: no judgements found")
    _check_qrels_ids(qrels_path, corpus, queries)
    return BeirData(corpus=corpus, queries=queries, qrels=qrels, qrels_path=str(qrels_path))


def find_run_file(folder: str | os.PathLike, split: str) -> Path:
    """The single candidates/<split>.*.tsv (or .trec/.txt) run file of a BEIR folder."""
    candidates = Path(folder) / "candidates"
    found = sorted(p for p in candidates.glob(f"{split}.*") if p.suffix in (".tsv", ".trec", ".txt", ".run"))
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise DataError(f"{candidates}: expected exactly one run file '{split}.*.tsv' for split '{split}', "
                        f"found {names}")
    return found[0]
