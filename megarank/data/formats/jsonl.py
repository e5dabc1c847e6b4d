"""JSONL training groups, one group per line, in either spelling: NeMo AutoModel's inline form (``query`` or
``question``, ``pos_doc``, ``neg_doc``; a document, or a list of them) or FlagEmbedding's reranker form (``query``,
``pos``, ``neg``: lists; optional ``prompt``). Both carry the optional ``pos_scores`` / ``neg_scores`` (teacher
logits) and ``pos_labels`` (graded relevance of the positives).

A line that mixes the spellings, or a file whose lines use both, is an error naming the line.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

from ..errors import DataError, where
from ..readers import json_object, text_lines
from .records import FLAG_FIELDS, NEMO_FIELDS, parse_group, record_error

log = logging.getLogger(__name__)

MAX_LOGGED_BAD = 5

_SPELLING = {NEMO_FIELDS: "NeMo AutoModel's 'pos_doc'/'neg_doc'", FLAG_FIELDS: "FlagEmbedding's 'pos'/'neg'"}


def _spelling(at: str, obj: dict) -> tuple[str, str]:
    nemo = [k for k in NEMO_FIELDS if k in obj]
    flag = [k for k in FLAG_FIELDS if k in obj]
    if nemo and flag:
        raise record_error(at, f"mixes the field spellings ('{nemo[0]}' and '{flag[0]}'); use 'pos_doc'/'neg_doc' "
                           "(NeMo AutoModel) or 'pos'/'neg' (FlagEmbedding)")
    return FLAG_FIELDS if flag else NEMO_FIELDS


def _query_key(at: str, obj: dict) -> str:
    if "query" in obj and "question" in obj:
        raise record_error(at, "has both 'query' and 'question'; keep one")
    return "question" if "question" in obj else "query"


def parse_line(at: str, obj: dict, spelling: tuple[str, str]) -> dict:
    """The group of one JSONL object written in ``spelling`` (NEMO_FIELDS or FLAG_FIELDS)."""
    nemo = spelling == NEMO_FIELDS
    group = parse_group(at, obj, _query_key(at, obj) if nemo else "query", *spelling, single_docs=nemo)
    if not nemo and obj.get("prompt") is not None:
        if not isinstance(obj["prompt"], str):
            raise record_error(at, f"'prompt' must be a string, got {type(obj['prompt']).__name__}")
        group["prompt"] = obj["prompt"]
    return group


def read_jsonl_groups(path: str | os.PathLike, skip_bad_lines: bool = False) -> tuple[list[dict], int]:
    """Training groups of a JSONL file: ``(groups, n_skipped)``. Each group is ``{"query", "pos", "neg", "line",
    "at"}`` with texts in pos/neg, plus the optional fields present (``prompt`` for FlagEmbedding lines).

    The first good line fixes the file's spelling; a later line in the other one is an error naming it. With
    `skip_bad_lines`, bad lines (malformed, or in the other spelling) are counted and the first few logged.
    """
    path = Path(path)
    groups, bad = [], []
    first: tuple[int, tuple[str, str]] | None = None
    for number, line in text_lines(path, bad if skip_bad_lines else None):
        at = where(path, number)
        try:
            obj = json_object(path, number, line)
            spelling = _spelling(at, obj)
            if first is not None and spelling != first[1]:
                raise record_error(at, f"uses {_SPELLING[spelling]} but line {first[0]} uses {_SPELLING[first[1]]}; "
                                   "a file uses one spelling")
            groups.append({**parse_line(at, obj, spelling), "line": number})
            first = first or (number, spelling)
        except DataError as e:
            if not skip_bad_lines:
                raise
            bad.append(str(e))
    return groups, report_skipped(path, groups, bad, "lines")


def report_skipped(path: Any, groups: Sequence, bad: list[str], unit: str) -> int:
    """Log the bad `unit` (lines, rows, records) skipped, the first few in full, and return their count; a file
    with no group left is an error."""
    if bad:
        log.warning("skipped %d bad %s in %s, first: %s", len(bad), unit, path, "; ".join(bad[:MAX_LOGGED_BAD]))
    if not len(groups):
        raise DataError(f"{path}: no training groups found" + (f" ({len(bad)} bad {unit} skipped)" if bad else ""))
    return len(bad)


def check_prompts(groups: Sequence[dict], template: str) -> None:
    """FlagEmbedding's ``prompt`` (its input is ``query [sep] passage [sep] prompt``) must already be in
    ``data.template``: megarank reads one template for training, evaluation and the export, so a prompt that the
    template lacks would train the model on an input it never sees again. A line whose prompt is not in the
    template is an error naming it and the key."""
    prompts = getattr(groups, "prompts", None)  # an indexed file: its distinct prompts with their first line
    found = ((p, where(groups.path, line)) for p, line in prompts) if prompts is not None else \
        ((g.get("prompt"), g["at"]) for g in groups)
    for prompt, at in found:
        if prompt and prompt not in template:
            raise record_error(at, f"'prompt' {prompt[:60]!r} is not in data.template; megarank's input is "
                               "data.template alone, so write the prompt into it (e.g. \"{query} \\n {passage} \\n "
                               "<prompt>\") or drop 'prompt' from the file")
