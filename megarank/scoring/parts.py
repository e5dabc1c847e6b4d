"""A scoring job saved as it goes: the scores of each chunk of queries in a file of its own, so that a killed job
scores only what it had not saved (``megarank rerank --out``, ``Reranker.evaluate_beir(parts_dir=...)``).

    <parts_dir>/job.json          what the job scores: data, split, run, top-k, queries per part, model, dtype and
                                  a SHA-256 of the (qid, docid) pairs; a resume must match it
    <parts_dir>/part-000000.trec  the scores of queries [0, n) of the job in TREC format, written atomically
    ...

Rank 0 reads and writes the folder (a shared file system is not needed) and tells the other ranks what is done
and what the saved parts hold.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from megarank.data.errors import DataError
from megarank.files import atomic_write_text
from megarank.scoring.metrics import read_trec_run, write_trec_run

JOB_FILE = "job.json"


def part_name(index: int) -> str:
    return f"part-{index:06d}.trec"


def pairs_digest(pairs) -> str:
    """SHA-256 of the job's (qid, docid) pairs in order: two jobs with the same digest score the same pairs."""
    h = hashlib.sha256()
    for qid, docid in pairs:
        h.update(f"{qid}\t{docid}\n".encode())
    return h.hexdigest()


def _broadcast(value):
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)  # between this job's own ranks
    return box[0]


def _is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class ScoringParts:
    """The parts folder of one scoring job. Collective: every rank creates it and calls ``open``/``save``/``load_done``
    in the same order."""

    def __init__(self, folder, job: dict):
        self.folder = Path(folder)
        self.job = job

    def open(self, n_parts: int) -> list[int]:
        """Create the folder for a new job or check that it holds this job; -> the indices of the parts already
        saved (the same on every rank). A folder holding another job is an error naming what differs."""
        problem, done = None, []
        if _is_rank0():
            problem, done = self._open_here(n_parts)
        problem, done = _broadcast((problem, done))
        if problem:
            raise DataError(problem)
        return done

    def _open_here(self, n_parts: int) -> tuple[Optional[str], list[int]]:
        job_file = self.folder / JOB_FILE
        if not job_file.exists():
            if self.folder.exists() and any(self.folder.iterdir()):
                return f"{self.folder}: exists and is not a scoring job's parts folder; remove it or score elsewhere", []
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(job_file, json.dumps(self.job, indent=1, sort_keys=True))
            return None, []
        try:
            saved = json.loads(job_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            return f"{job_file}: cannot be read ({e}); remove {self.folder} to score from scratch", []
        differ = sorted(k for k in set(saved) | set(self.job) if saved.get(k) != self.job.get(k))
        if differ:
            key = differ[0]
            return (f"{self.folder} holds the parts of another scoring job ({key}: {saved.get(key)!r} there, "
                    f"{self.job.get(key)!r} now); remove it to start over or keep the old arguments"), []
        done = [i for i in range(n_parts) if (self.folder / part_name(i)).is_file()]
        return None, done

    def save(self, index: int, scores: dict) -> None:
        """Rank 0 writes part ``index`` ({qid: {docid: score}}) atomically; the other ranks do nothing."""
        if _is_rank0():
            write_trec_run(self.folder / part_name(index), scores, tag="megarank")

    def load(self, indices: list[int]) -> dict:
        """{qid: {docid: score}} of the saved parts ``indices``, read on rank 0 and sent to every rank."""
        scores: dict = {}
        if _is_rank0():
            for i in indices:
                scores.update(read_trec_run(self.folder / part_name(i)))
        return _broadcast(scores)

    def remove(self) -> None:
        """Rank 0 deletes the parts and the folder (after the merged run is written)."""
        if _is_rank0() and self.folder.is_dir():
            for path in self.folder.iterdir():
                path.unlink()
            os.rmdir(self.folder)
