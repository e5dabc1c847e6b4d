"""Checks that run before any real work (and before importing torch / megatron-core): the inputs a command
names exist, and the folders it will write into can be written.

A run that would fail at its last step (``evaluate --out`` into a read-only folder after all the scoring,
a checkpoint folder that cannot be created after all the training) fails here in a second instead, with one
sentence naming the flag or config key, and nothing written.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional


class UsageError(ValueError):
    """A command-line argument (a path, a flag) that cannot work; the message names the flag."""


def _existing_ancestor(path: Path) -> Path:
    """`path` itself or its nearest ancestor that exists (the folder that would have to be written into)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_write(folder: Path) -> Optional[str]:
    """Why a file cannot be created in `folder` (None if it can): a real create, since os.access is wrong
    for root, read-only mounts and network file systems."""
    try:
        fd, name = tempfile.mkstemp(prefix=".megarank-write-check-", dir=folder)
    except OSError as e:
        return e.strerror or str(e)
    os.close(fd)
    os.unlink(name)
    return None


def output_dir_problem(path: str | os.PathLike) -> Optional[str]:
    """Why the folder `path` cannot be created or written into (None if it can), without creating it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{path} is a file, not a folder"
    base = _existing_ancestor(path)
    if not base.is_dir():
        return f"{base} is a file, so the folder {path} cannot be created"
    reason = _probe_write(base)
    if reason:
        return f"{base} is not writable ({reason})" if base == Path(os.path.abspath(path)) else \
            f"{path} cannot be created: {base} is not writable ({reason})"
    return None


def output_file_problem(path: str | os.PathLike) -> Optional[str]:
    """Why the file `path` cannot be written (None if it can); an existing file is fine (it is replaced)."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a folder, expected a file name"
    if path.exists() and not os.access(path, os.W_OK) and os.geteuid() != 0:
        return f"{path} exists and is read-only"
    return output_dir_problem(path.parent if str(path.parent) else Path("."))


def check_output_file(path: Optional[str], flag: str) -> None:
    if path is not None and (problem := output_file_problem(path)):
        raise UsageError(f"{flag} {path}: {problem}")


def check_output_dir(path: Optional[str], name: str, error=UsageError) -> None:
    if path is not None and (problem := output_dir_problem(path)):
        raise error(f"{name} {path}: {problem}")


def input_problem(path: str | os.PathLike, kind: str) -> Optional[str]:
    """Why `path` is not an existing `kind` ("file" or "folder"), or None."""
    path = Path(path)
    if not path.exists():
        return "does not exist"
    if kind == "folder" and not path.is_dir():
        return "is a file, expected a folder"
    if kind == "file" and path.is_dir():
        return "is a folder, expected a file"
    return None


def checkpoint_problem(path: str | os.PathLike) -> Optional[str]:
    """Why `path` is neither a folder nor a run directory's ``latest`` file (which names its newest step), or None."""
    from megarank.checkpoint.layout import LATEST

    return None if Path(path).name == LATEST and Path(path).is_file() else input_problem(path, "folder")


def check_input(path: Optional[str], name: str, kind: str, error=UsageError, hint: str = "") -> None:
    if path is not None and (problem := input_problem(path, kind)):
        raise error(f"{name} {path} {problem}{hint}")


def beir_problem(folder: str | os.PathLike, split: Optional[str]) -> Optional[str]:
    """Why `folder` is not a BEIR folder with qrels for `split` (None if it is one): the files, not their contents."""
    folder = Path(folder)
    if problem := input_problem(folder, "folder"):
        return problem
    missing = [n for n in ("corpus.jsonl", "queries.jsonl") if not (folder / n).is_file()]
    if missing:
        return f"is not a BEIR folder (no {' or '.join(missing)})"
    if split is not None and not (folder / "qrels" / f"{split}.tsv").is_file():
        splits = sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))
        return f"has no qrels/{split}.tsv (splits there: {', '.join(splits) or 'none'})"
    return None


_EXPECTED = {"jsonl": "a JSONL file", "triples": "a TSV file", "nemo_corpus": "a NeMo AutoModel corpus-id JSON file",
             "parquet": "a Parquet file or a folder of them", "hf_disk": "a datasets save_to_disk folder",
             "beir": "a BEIR folder"}


def train_path_problem(fmt: str, path: str | os.PathLike, split: str) -> Optional[str]:
    """Why `path` is not the kind of file or folder `fmt` reads (None if it is): the files, not their contents."""
    path = Path(path)
    if fmt == "beir":
        return beir_problem(path, split)
    if fmt in ("jsonl", "triples", "nemo_corpus"):
        return input_problem(path, "file")
    if not path.exists():
        return "does not exist"
    if fmt == "parquet":
        return None if path.is_file() or any(path.rglob("*.parquet")) else "holds no .parquet file"
    if not path.is_dir():
        return "is a file, expected a folder"
    if (path / "dataset_dict.json").is_file():
        return None if (path / split / "state.json").is_file() else \
            f"is a DatasetDict without the split '{split}' (data.train_split)"
    return None if (path / "state.json").is_file() else "has no state.json or dataset_dict.json"


def check_train_config(cfg) -> None:
    """Every path a training config names: inputs exist, outputs can be written. Raises ConfigError naming
    the key (all problems at once, like `validate`)."""
    from megarank.config import ConfigError

    d, c = cfg.data, cfg.checkpoint
    errors = []
    if d.train_path is not None and (problem := train_path_problem(d.format, d.train_path, d.train_split)):
        errors.append(f"data.train_path {d.train_path} {problem} (data.format={d.format} expects "
                      f"{_EXPECTED[d.format]})")
    for i, e in enumerate(d.blend):
        if e.path and e.format and (problem := train_path_problem(e.format, e.path, e.split)):
            errors.append(f"data.blend[{i}].path {e.path} {problem} (format {e.format} expects {_EXPECTED[e.format]})")
        if e.run is not None and (problem := input_problem(e.run, "file")):
            errors.append(f"data.blend[{i}].run {e.run} {problem}")
    valid_format, valid_split = d.valid_format or d.format, d.valid_split or d.train_split
    if d.valid_path is not None and (problem := train_path_problem(valid_format, d.valid_path, valid_split)):
        errors.append(f"data.valid_path {d.valid_path} {problem} (format {valid_format} expects "
                      f"{_EXPECTED[valid_format]})")
    if d.eval_path is not None and (problem := beir_problem(d.eval_path, d.eval_split)):
        errors.append(f"data.eval_path {d.eval_path} {problem}")
    for key, path, kind in (("data.train_run", d.train_run, "file"), ("data.eval_run", d.eval_run, "file"),
                            ("data.tokenizer", d.tokenizer, "folder")):
        if path is not None and (problem := input_problem(path, kind)):
            errors.append(f"{key} {path} {problem}")
    if c.load is not None and (problem := checkpoint_problem(c.load)):
        errors.append(f"checkpoint.load {c.load} {problem}")
    for key, path in (("checkpoint.dir", c.dir), ("logging.tensorboard_dir", cfg.logging.tensorboard_dir)):
        if path is not None and (problem := output_dir_problem(path)):
            errors.append(f"{key} {path}: {problem}")
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors) if len(errors) > 1 else errors[0])
