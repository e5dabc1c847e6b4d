"""MS MARCO-style text triples: one ``query <TAB> positive <TAB> negative`` per line, no header (the layout of
MS MARCO's ``triples.train.small.tsv``). Lines with the same query text form one group, in the order the queries
first appear; its positives and negatives are the distinct texts of its lines, in order of first appearance.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError, where
from ..readers import text_lines
from .jsonl import report_skipped
from .records import record_error

_FIELDS = ("query", "positive", "negative")
_NAMES = {"pos": "positive", "neg": "negative"}


def _triple(at: str, line: str) -> tuple[str, str, str]:
    cols = line.split("\t")
    if len(cols) != 3:
        raise record_error(at, f"expected 3 tab-separated columns (query, positive, negative), got {len(cols)}")
    for name, text in zip(_FIELDS, cols):
        if not text.strip():
            raise record_error(at, f"the {name} is empty")
    return cols[0], cols[1], cols[2]


def read_triples(path: str | os.PathLike, skip_bad_lines: bool = False) -> tuple[list[dict], int]:
    """Groups ``{"query", "pos", "neg", "line", "at"}`` of a triples file (``line``/``at``: the query's first line).

    A text that is a positive of a query on one line and its negative on another is an error naming the line.
    With `skip_bad_lines`, bad lines are counted and skipped instead.
    """
    path = Path(path)
    groups: dict[str, dict] = {}
    bad: list[str] = []
    for number, line in text_lines(path, bad if skip_bad_lines else None):
        at = where(path, number)
        try:
            query, positive, negative = _triple(at, line)
            group = groups.get(query) or {"query": query, "pos": {}, "neg": {}, "line": number, "at": at}
            for text, mine, other in ((positive, "positive", "neg"), (negative, "negative", "pos")):
                if text in group[other]:
                    raise record_error(at, f"the {mine} text is also a {_NAMES[other]} of this query (line "
                                       f"{group[other][text]})")
            groups[query] = group
            group["pos"].setdefault(positive, number)
            group["neg"].setdefault(negative, number)
        except DataError as e:
            if not skip_bad_lines:
                raise
            bad.append(str(e))
    out = [{**g, "pos": list(g["pos"]), "neg": list(g["neg"])} for g in groups.values()]
    return out, report_skipped(path, out, bad, "lines")
