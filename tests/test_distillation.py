"""Distillation end to end with real processes: the README's teacher -> mine -> student block as written, and a
student that learns a teacher's ranking from its scores (on held-out queries) where hard labels teach none of it."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megarank.data import read_scored_run, sample_data_dir
from tests.training_harness import megarank_cmd, run, run_env, run_many, train_cmd

REPO = Path(__file__).resolve().parents[1]
SAMPLE = sample_data_dir()


def _readme_block(title: str) -> list[str]:
    """The commands of the README's first bash block under ``## <title>``, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(f"## {title}"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            commands.append(line.strip())
    return commands


def test_readme_distillation_block_runs_as_written(tmp_path):
    commands = _readme_block("Distil a teacher")
    assert [c.split()[:2] for c in commands] == [["megarank", "train"], ["megarank", "rerank"], ["megarank", "mine"],
                                                  ["megarank", "train"]]
    for name in ("configs", "megarank"):  # the repo-relative paths the block uses, without writing into the repo
        (tmp_path / name).symlink_to(REPO / name)
    env = run_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for command in commands:
        proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"{command}\n{(proc.stdout + proc.stderr)[-3000:]}"
    out = tmp_path / "runs" / "distil"
    teacher = read_scored_run(out / "teacher.trec")
    assert len(teacher) == 6 and all(len(docs) == 10 for docs in teacher.values())
    groups = [json.loads(line) for line in (out / "groups.jsonl").read_text().splitlines()]
    assert len(groups) == 6 and all(len(g["neg_doc"]) == 2 == len(g["neg_scores"]) for g in groups)
    for g in groups:  # every kept negative is below 95% of the weakest positive's probability
        weakest = min(g["pos_scores"])
        assert all(1 / (1 + 2.718281828459045 ** -s) < 0.95 / (1 + 2.718281828459045 ** -weakest) for s in g["neg_scores"])
        assert g["pos_scores"] == [teacher[g["qid"]][d] for d in g["pos_ids"]]
    audit = json.loads((out / "groups.jsonl.audit.json").read_text())
    assert audit["totals"]["queries_written"] == 6
    assert (out / "groups.jsonl.audit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "student" / "latest").read_text().strip() == "step-20"


def _mean_kendall_tau(reference: dict, other: dict) -> float:
    from scipy.stats import kendalltau

    taus = [kendalltau([reference[q][d] for d in reference[q]], [other[q][d] for d in reference[q]]).statistic
            for q in reference]
    return sum(taus) / len(taus)


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    """A random tiny teacher (init-tiny, another seed) scores the sample's train and test candidates; two students
    from the same init train 200 steps on the train split: one on the teacher's scores (kl), one on hard labels."""
    work = tmp_path_factory.mktemp("distil")
    run(megarank_cmd(1, "init-tiny", "teacher", "--seed", "7"), cwd=work)
    score = ["--data", str(SAMPLE), "--top-k", "100", "--dtype", "fp32"]
    run_many({split: (1, megarank_cmd(1, "rerank", "teacher", *score, "--split", split, "--out", f"teacher-{split}.trec"))
              for split in ("train", "test")}, cwd=work)
    common = ["train.steps=200", "train.log_interval=50", "checkpoint.save_interval=200"]
    run_many({"kl": (1, train_cmd(1, *common, "train.loss=kl", "data.teacher_run=teacher-train.trec", "checkpoint.dir=kl")),
              "hard": (1, train_cmd(1, *common, "checkpoint.dir=hard"))}, cwd=work)
    run_many({name: (1, megarank_cmd(1, "rerank", name, *score, "--split", "test", "--out", f"{name}-test.trec"))
              for name in ("kl", "hard")}, cwd=work)
    return {name: read_scored_run(work / f"{name}-test.trec") for name in ("teacher", "kl", "hard")}


def test_a_student_distilled_from_teacher_scores_ranks_held_out_queries_like_the_teacher(students):
    teacher = students["teacher"]
    distilled, hard = _mean_kendall_tau(teacher, students["kl"]), _mean_kendall_tau(teacher, students["hard"])
    # Measured: 0.90 vs 0.10 (the qrels say nothing about a random teacher's ranking)
    assert distilled > 0.6 and distilled > hard + 0.4, (distilled, hard)
