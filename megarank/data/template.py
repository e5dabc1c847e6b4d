"""The prompt template that turns a (query, passage) pair into the one string the reranker reads."""

from __future__ import annotations

from typing import Mapping, Union

DEFAULT_TEMPLATE = "question:{query} \n \n passage:{passage}"

Doc = Union[str, Mapping[str, str]]


def doc_to_text(doc: Doc) -> str:
    """Passage text of a document: a string as is, or ``"{title} {text}"`` for a dict with a non-empty title."""
    if isinstance(doc, str):
        return doc
    text = doc.get("text") or ""
    title = doc.get("title") or ""
    return f"{title} {text}".strip() if title else text


def format_pair(query: str, passage: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The single input string for one pair (a pair is never given to the tokenizer as a text pair)."""
    return template.format(query=query, passage=passage)
