"""Query-first-safe truncation of one reranker input (docs/data.md, "Truncation").

A pair is ONE string, ``template.format(query=..., passage=...)``, tokenized as a whole (never as a text pair), so
the ids of a pair that fits are exactly the tokenization of that string. When BOS + those ids exceed
``data.max_length``, tokens are dropped from the query's and the passage's own tokens only (the template's text is
always kept, also text after ``{passage}``):

* the passage is cut first, from its end;
* the query is cut (from its end) only when the passage alone cannot make room, and never below
  ``max_query_length`` tokens: a long query can never push the whole passage out;
* so, with ``room`` = max_length - 1 (BOS) - the template's tokens, ``nq`` / ``np`` the query's / passage's tokens:
  ``q_keep = min(nq, max(max_query_length, room - np))``, ``p_keep = min(np, room - q_keep)``.

Which tokens are the query's and the passage's comes from the tokenizer's character offsets: a token belongs to
the field its first character is in (a token that straddles the template text and a field, such as ``":what"``
for Llama 3, belongs to the side it starts on). The kept ids are a subsequence of the whole string's ids, so a
pair whose query is within ``max_query_length`` and whose template ends with ``{passage}`` gets exactly the first
max_length ids: what right-truncating the whole string gives.

This module imports nothing from megarank: ``checkpoint_tools/hf_modeling/tokenization_megarank.py`` (shipped
beside every export, where megarank is not installed) holds a copy of ``field_spans`` and ``cut_row``;
tests/test_truncation.py checks that the two agree.
"""
from __future__ import annotations

import string
from dataclasses import dataclass


def field_spans(template: str, query: str, passage: str) -> tuple[str, list, list]:
    """(the formatted string, [(start, end)] of each {query}, [(start, end)] of each {passage}) in characters."""
    text, q_spans, p_spans = [], [], []
    pos = 0
    for literal, field, _, _ in string.Formatter().parse(template):
        text.append(literal)
        pos += len(literal)
        if field is None:
            continue
        value = {"query": query, "passage": passage}[field]
        (q_spans if field == "query" else p_spans).append((pos, pos + len(value)))
        text.append(value)
        pos += len(value)
    return "".join(text), q_spans, p_spans


def cut_row(ids: list, offsets: list, q_spans: list, p_spans: list, keep: int, max_query: int) -> tuple:
    """(kept ids, query cut?, passage cut?) for one row of ``ids`` (its character ``offsets``) within ``keep`` tokens.

    ``max_query``: tokens the query keeps however long the passage (the passage is cut first)."""
    if len(ids) <= keep:
        return list(ids), False, False

    def owner(start):
        if any(a <= start < b for a, b in q_spans):
            return "q"
        if any(a <= start < b for a, b in p_spans):
            return "p"
        return ""

    owners = [owner(o[0]) for o in offsets]
    nq, np_ = owners.count("q"), owners.count("p")
    room = keep - (len(ids) - nq - np_)
    q_keep = min(nq, max(max_query, room - np_))
    p_keep = max(0, min(np_, room - q_keep))
    out, seen = [], {"q": 0, "p": 0}
    for tok, who in zip(ids, owners):
        if who:
            seen[who] += 1
            if seen[who] > (q_keep if who == "q" else p_keep):
                continue
        out.append(tok)
    return out[:keep], q_keep < nq, p_keep < np_  # [:keep]: only when the template's own text is over budget


@dataclass
class TruncationCounts:
    """Pairs encoded, and how many of them had their query / their passage cut (a pair can count in both)."""

    pairs: int = 0
    query_cut: int = 0
    passage_cut: int = 0

    def copy(self) -> "TruncationCounts":
        return TruncationCounts(self.pairs, self.query_cut, self.passage_cut)

    def __sub__(self, other: "TruncationCounts") -> "TruncationCounts":
        return TruncationCounts(self.pairs - other.pairs, self.query_cut - other.query_cut,
                                self.passage_cut - other.passage_cut)

    def message(self, what: str, max_query_length: int, max_length: int) -> str | None:
        """One line for the log, or None when no pair was cut: ``data: 12 of 5,000 training pairs had their query
        cut to data.max_query_length=256 tokens; 1,020 had their passage cut to fit data.max_length=512``."""
        if not (self.query_cut or self.passage_cut):
            return None
        return (f"data: {self.query_cut:,} of {self.pairs:,} {what} had their query cut (to no fewer than "
                f"data.max_query_length={max_query_length} tokens); {self.passage_cut:,} had their passage cut to fit "
                f"data.max_length={max_length} (docs/data.md#truncation)")
