"""The one exception type for bad input data, and helpers that phrase its messages.

Every message is one sentence that names the file and, where there is one, the 1-based line:
``"train.jsonl line 7: 'pos_doc' is empty"``.
"""

from __future__ import annotations

import os


class DataError(ValueError):
    """Input data (a file, a line, an id) is malformed or inconsistent."""


def where(path: str | os.PathLike, line: int | None = None) -> str:
    """``"path line N"`` (or just ``"path"``) for the start of an error message."""
    return f"{os.fspath(path)} line {line}" if line is not None else os.fspath(path)


def data_error(path: str | os.PathLike, line: int | None, problem: str) -> DataError:
    """A DataError reading ``"<path> line <line>: <problem>"``."""
    return DataError(f"{where(path, line)}: {problem}")
