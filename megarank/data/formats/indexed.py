"""JSONL groups and TSV triples read through an index (`index.py`): the file is checked once, as the eager readers
(`jsonl.read_jsonl_groups`, `triples.read_triples`) check it, and each good record's byte offsets are kept in a
memory-mapped array; a group is read (``os.pread``) and parsed when it is indexed, giving exactly the dict the
eager reader gives for it. Bad lines are reported at the build as those readers report them (the first one is the
error; with ``skip_bad_lines`` their count and the first few are logged, again each time the index is reused).
"""

from __future__ import annotations

import os
from array import array
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError, where
from ..readers import _check_readable, _decode, json_object, located_text_lines
from .index import bad_fields, check_unchanged, open_index, recorded_bad
from .jsonl import _SPELLING, _spelling, parse_line, report_skipped
from .records import FLAG_FIELDS, NEMO_FIELDS, record_error
from .triples import _NAMES, _triple


class _IndexedLines(Sequence):
    """The common part: the file held open for ``pread``, its index's arrays, the per-group counts that
    ``GroupsFileSource`` checks without parsing every record."""

    def __init__(self, path: Path, index):
        self.path = path
        self.index = index
        self.stamp = index.header["files"][0]
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        if hasattr(os, "posix_fadvise"):  # records are drawn at random: no read-ahead into the page cache
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
        self.n_pos, self.n_neg, self.teacher = index["n_pos"], index["n_neg"], index["teacher"]

    def __len__(self) -> int:
        return len(self.n_pos)

    def __del__(self):
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1

    def group_counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(positives, negatives, has teacher scores) of every group, from the index."""
        return self.n_pos, self.n_neg, self.teacher

    def _line(self, number: int, offset: int, length: int) -> str:
        check_unchanged(self.path, self.stamp, self.fd, self.index.path)
        return _decode(self.path, number, os.pread(self.fd, length, offset)).rstrip("\r\n")

    def skipped(self) -> int:
        """Log the skipped lines recorded at the build (as the eager reader logs them); their count."""
        return report_skipped(self.path, self, recorded_bad(self.index), "lines")


class JsonlGroups(_IndexedLines):
    """The good lines of a JSONL groups file as the group dicts `read_jsonl_groups` gives, parsed on access."""

    def __init__(self, path: Path, index):
        super().__init__(path, index)
        self.offsets, self.lengths, self.lines = index["offset"], index["length"], index["line"]
        self.spelling = tuple(index.header["spelling"])
        self.prompts = [(p, int(line)) for p, line in index.header["prompts"]]

    def __getitem__(self, i: int) -> dict:
        number = int(self.lines[i])
        line = self._line(number, int(self.offsets[i]), int(self.lengths[i]))
        at = where(self.path, number)
        return {**parse_line(at, json_object(self.path, number, line), self.spelling), "line": number}


def _build_jsonl(path: Path, skip_bad: bool):
    def build(_):
        bad: list[str] = []
        cols = {k: array("q") for k in ("offset", "length", "line", "n_pos", "n_neg", "teacher")}  # 8 B a value
        first, prompts = None, {}
        for number, offset, length, line in located_text_lines(path, bad if skip_bad else None):
            at = where(path, number)
            try:
                obj = json_object(path, number, line)
                spelling = _spelling(at, obj)
                if first is not None and spelling != first[1]:
                    raise record_error(at, f"uses {_SPELLING[spelling]} but line {first[0]} uses "
                                       f"{_SPELLING[first[1]]}; a file uses one spelling")
                group = parse_line(at, obj, spelling)
            except DataError as e:
                if not skip_bad:
                    raise
                bad.append(str(e))
                continue
            first = first or (number, spelling)
            for key, value in (("offset", offset), ("length", length), ("line", number), ("n_pos", len(group["pos"])),
                               ("n_neg", len(group["neg"])), ("teacher", "pos_scores" in group)):
                cols[key].append(value)
            if group.get("prompt"):
                prompts.setdefault(group["prompt"], number)
        if not cols["line"]:
            report_skipped(path, [], bad, "lines")  # the eager reader's "no training groups found"
        arrays = {k: np.frombuffer(v, dtype=np.int64).astype(np.bool_ if k == "teacher" else np.int64)
                  for k, v in cols.items()}
        return {**bad_fields(bad),
                "spelling": list(first[1] if first else NEMO_FIELDS), "prompts": list(prompts.items())}, arrays
    return build


def open_jsonl_groups(path: str | os.PathLike, skip_bad_lines: bool = False) -> tuple[JsonlGroups, int]:
    """`read_jsonl_groups` through an index: ``(groups, n_skipped)``, the groups parsed on access."""
    path = Path(path)
    _check_readable(path)
    index = open_index(path, [path], "jsonl", {"skip_bad_lines": skip_bad_lines}, _build_jsonl(path, skip_bad_lines))
    groups = JsonlGroups(path, index)
    return groups, groups.skipped()


class TriplesGroups(_IndexedLines):
    """The groups of a triples file as the dicts `read_triples` gives: group ``i``'s good lines are
    ``ptr[i]:ptr[i+1]`` of the offset arrays, re-read and merged on access."""

    def __init__(self, path: Path, index):
        super().__init__(path, index)
        self.ptr, self.offsets, self.lengths, self.lines = index["ptr"], index["offset"], index["length"], index["line"]

    def __getitem__(self, i: int) -> dict:
        i = range(len(self))[i]  # IndexError past the end, negative indices from it
        start, end = int(self.ptr[i]), int(self.ptr[i + 1])
        pos: dict[str, int] = {}
        neg: dict[str, int] = {}
        query = None
        for k in range(start, end):
            number = int(self.lines[k])
            query, positive, negative = _triple(where(self.path, number),
                                                self._line(number, int(self.offsets[k]), int(self.lengths[k])))
            pos.setdefault(positive, number)
            neg.setdefault(negative, number)
        first = int(self.lines[start])
        return {"query": query, "pos": list(pos), "neg": list(neg), "line": first, "at": where(self.path, first)}


def _build_triples(path: Path, skip_bad: bool):
    def build(_):
        bad: list[str] = []
        group_of: dict[str, int] = {}
        texts: list[dict[int, list]] = []  # per group: hash(text) -> [line as positive, line as negative]
        cols = {k: array("q") for k in ("group", "offset", "length", "line")}
        for number, offset, length, line in located_text_lines(path, bad if skip_bad else None):
            at = where(path, number)
            try:
                query, positive, negative = _triple(at, line)
                g = group_of.get(query, len(texts))
                seen = texts[g] if g < len(texts) else {}
                for text, mine, other in ((positive, "positive", 1), (negative, "negative", 0)):
                    lines = seen.get(hash(text))
                    if lines is not None and lines[other] is not None:
                        raise record_error(at, f"the {mine} text is also a {_NAMES[('pos', 'neg')[other]]} of this "
                                           f"query (line {lines[other]})")
            except DataError as e:
                if not skip_bad:
                    raise
                bad.append(str(e))
                continue
            if g == len(texts):
                group_of[query] = g
                texts.append(seen)
            for text, role in ((positive, 0), (negative, 1)):
                lines = seen.setdefault(hash(text), [None, None])
                if lines[role] is None:
                    lines[role] = number
            for key, value in (("group", g), ("offset", offset), ("length", length), ("line", number)):
                cols[key].append(value)
        if not texts:
            report_skipped(path, texts, bad, "lines")  # the eager reader's "no training groups found"
        group = np.frombuffer(cols.pop("group"), dtype=np.int64)
        order = np.argsort(group, kind="stable")
        arrays = {k: np.frombuffer(v, dtype=np.int64)[order] for k, v in cols.items()}
        arrays["ptr"] = np.concatenate([[0], np.cumsum(np.bincount(group, minlength=len(texts)))]).astype(np.int64)
        arrays["n_pos"] = np.asarray([sum(v[0] is not None for v in t.values()) for t in texts], dtype=np.int64)
        arrays["n_neg"] = np.asarray([sum(v[1] is not None for v in t.values()) for t in texts], dtype=np.int64)
        arrays["teacher"] = np.zeros(len(texts), dtype=np.bool_)
        return bad_fields(bad), arrays
    return build


def open_triples(path: str | os.PathLike, skip_bad_lines: bool = False) -> tuple[TriplesGroups, int]:
    """`read_triples` through an index: ``(groups, n_skipped)``, each group's lines re-read on access."""
    path = Path(path)
    _check_readable(path)
    index = open_index(path, [path], "triples", {"skip_bad_lines": skip_bad_lines},
                       _build_triples(path, skip_bad_lines))
    groups = TriplesGroups(path, index)
    return groups, groups.skipped()


__all__ = ["FLAG_FIELDS", "JsonlGroups", "TriplesGroups", "open_jsonl_groups", "open_triples"]
