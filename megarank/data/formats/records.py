"""One training group record, whatever file it came from: checked field by field into the dict that
``GroupsFileSource`` reads (``{"query", "pos", "neg", "at"}`` with texts, plus the optional ``pos_scores``,
``neg_scores``, ``pos_labels`` and ``prompt``).

``at`` names the record in error messages: ``"train.jsonl line 7"``, ``"train.parquet row 3"``,
``"train.json data[2]"``. Every problem is a DataError reading ``"<at>: <problem>"``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from ..errors import DataError
from ..template import doc_to_text

# The two spellings of a JSONL group: NeMo AutoModel's inline form (and megarank's) and FlagEmbedding's.
NEMO_FIELDS = ("pos_doc", "neg_doc")
FLAG_FIELDS = ("pos", "neg")


def record_error(at: str, problem: str) -> DataError:
    return DataError(f"{at}: {problem}")


def doc_text(at: str, name: str, doc: Any) -> str:
    """Text of one document (a string, or ``{"text", "title"}``), rejecting wrong types and empty text."""
    if isinstance(doc, dict):
        if not isinstance(doc.get("text"), str) or not isinstance(doc.get("title") or "", str):
            raise record_error(at, f"{name} must have a string 'text' (and optional string 'title')")
    elif not isinstance(doc, str):
        raise record_error(at, f"{name} must be a string or an object with 'text', got {_kind(doc)}")
    text = doc_to_text(doc)
    if not text.strip():
        raise record_error(at, f"{name} is empty")
    return text


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def numbers(at: str, key: str, values: Any, length: int, docs: str, positive: bool) -> list[float]:
    """A list of finite numbers, one per entry of ``docs`` (and > 0 when ``positive``)."""
    if not isinstance(values, list):
        raise record_error(at, f"'{key}' must be a list of numbers, got {_kind(values)}")
    if len(values) != length:
        raise record_error(at, f"'{key}' has {len(values)} entries but '{docs}' has {length}")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise record_error(at, f"{key}[{i}] must be a number, got {_kind(v)}")
        if not math.isfinite(v):
            raise record_error(at, f"{key}[{i}] is {v}, not a finite number")
        if positive and v <= 0:
            raise record_error(at, f"{key}[{i}] is {v}; a positive's label must be > 0")
    return [float(v) for v in values]


def query_text(at: str, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise record_error(at, f"'{key}' must be a string, got {_kind(value)}")
    if not value.strip():
        raise record_error(at, f"'{key}' is empty")
    return value


def doc_list(at: str, key: str, value: Any, single_allowed: bool) -> list:
    """The documents of a field: a list, or (``single_allowed``) one document standing for a list of one."""
    if isinstance(value, list):
        return value
    if not single_allowed:
        raise record_error(at, f"'{key}' must be a list, got {_kind(value)}")
    if isinstance(value, (str, dict)):
        return [value]
    raise record_error(at, f"'{key}' must be a document or a list of documents, got {_kind(value)}")


def parse_group(at: str, obj: dict, query_key: str, pos_key: str, neg_key: str,
                single_docs: bool = False, extra_names: Optional[dict] = None) -> dict:
    """The group dict of one record whose query, positives and negatives are in ``obj[query_key]``,
    ``obj[pos_key]``, ``obj[neg_key]`` (texts or ``{"title", "text"}`` objects). ``extra_names`` maps the optional
    fields ``pos_scores``, ``neg_scores``, ``pos_labels`` to the names they have in ``obj`` (default: the same).
    Error messages use the names of ``obj``."""
    names = {"pos_scores": "pos_scores", "neg_scores": "neg_scores", "pos_labels": "pos_labels", **(extra_names or {})}
    for key in (query_key, pos_key, neg_key):
        if key not in obj:
            raise record_error(at, f"missing field '{key}'")
    query = query_text(at, query_key, obj[query_key])
    pos_docs = doc_list(at, pos_key, obj[pos_key], single_docs)
    neg_docs = doc_list(at, neg_key, obj[neg_key], single_docs)
    if not pos_docs:
        raise record_error(at, f"'{pos_key}' is empty")
    group = {"query": query, "pos": [doc_text(at, f"{pos_key}[{i}]", d) for i, d in enumerate(pos_docs)],
             "neg": [doc_text(at, f"{neg_key}[{i}]", d) for i, d in enumerate(neg_docs)], "at": at}
    for key, docs, positive in (("pos_scores", pos_key, False), ("neg_scores", neg_key, False),
                                ("pos_labels", pos_key, True)):
        if obj.get(names[key]) is not None:
            group[key] = numbers(at, names[key], obj[names[key]], len(pos_docs if docs == pos_key else neg_docs),
                                 docs, positive)
    if ("pos_scores" in group) != ("neg_scores" in group):
        raise record_error(at, f"has only one of '{names['pos_scores']}' and '{names['neg_scores']}'; teacher "
                           "scores need both")
    return group
