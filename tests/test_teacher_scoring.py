"""`megarank rerank --out` as a teacher-scoring job: the same scores at DP=2 and TP=2 as in one process, saved in
parts as it goes, and a SIGKILLed job that scores only the rest when run again (real processes, gloo, fp32)."""
import subprocess

import pytest

from megarank.data import read_scored_run, sample_data_dir
from tests.training_harness import all_stopped, kill_tree, megarank_cmd, run, run_env, run_many, script_cmd, wait_for

SAMPLE = sample_data_dir()
# fp32, fixed batches of 4 pairs, top 10: 6 judged test queries = 60 pairs in 15 batches; one query per part.
ARGS = ["--data", str(SAMPLE), "--split", "test", "--top-k", "10", "--dtype", "fp32", "--batch-tokens", "0",
        "--batch-size", "4", "--queries-per-part", "1"]

FREEZE = '''
import os
import signal
import sys

if __name__ == "__main__":
    from megarank.cli import main
    from megarank.scoring import parts

    real_save, saves = parts.ScoringParts.save, [0]

    def save_then_freeze(self, index, scores):
        real_save(self, index, scores)
        saves[0] += 1
        if saves[0] == int(sys.argv[1]):
            os.kill(os.getpid(), signal.SIGSTOP)  # every rank, after rank 0 wrote the part

    parts.ScoringParts.save = save_then_freeze
    sys.exit(main(["rerank", *sys.argv[2:]]))
'''


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """The built-in tiny random HF model: a teacher the scorer loads as an export (converted in memory)."""
    work = tmp_path_factory.mktemp("teacher")
    run(megarank_cmd(1, "init-tiny", str(work / "tiny-hf")), cwd=work)
    return work / "tiny-hf"


@pytest.fixture(scope="module")
def scored(teacher, tmp_path_factory):
    work = tmp_path_factory.mktemp("scored")
    # dp2: the teacher's training split (global batch 4 of micro-batches of 4) cannot run at DP=2; scoring can.
    layouts = {"one": (1, []), "dp2": (2, ["train.global_batch_size=4", "train.micro_batch_size=4"]), "tp2": (2, ["parallel.tensor_model_parallel_size=2"])}
    outputs = run_many({name: (n, megarank_cmd(n, "rerank", str(teacher), *extra, *ARGS, "--out", f"{name}.trec"))
                        for name, (n, extra) in layouts.items()}, cwd=work)
    return work, outputs


def test_teacher_scores_are_the_same_at_dp2_and_tp2(scored):
    work, outputs = scored
    one = read_scored_run(work / "one.trec")  # every row scored, finite
    assert len(one) == 6 and all(len(docs) == 10 for docs in one.values())
    assert not list(work.glob("*.parts")), "the parts are removed once the run is written"
    assert read_scored_run(work / "dp2.trec") == one, "DP=2 scores each batch as one process does: bit-identical"
    tp2 = read_scored_run(work / "tp2.trec")
    assert max(abs(tp2[q][d] - one[q][d]) for q in one for d in one[q]) < 1e-5
    assert len({s for docs in one.values() for s in docs.values()}) > 30, "the scores must differ to mean something"
    assert "scored 60 pairs in" in outputs["one"] and "pairs/s" in outputs["one"]
    assert "queries, top 10: megarank nDCG@10" in outputs["one"]  # the readable line before the JSON report


def test_a_killed_scoring_job_scores_only_the_rest(scored, teacher, tmp_path):
    work, _ = scored
    (tmp_path / "freeze.py").write_text(FREEZE)
    cmd = script_cmd(2, "freeze.py", "2", str(teacher), *ARGS, "--out", "run.trec")
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=run_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: all_stopped(proc, 2, "freeze.py"), 240, "both ranks stopped after part 2", proc)
        finally:
            kill_tree(proc)
    saved = sorted(p.name for p in (tmp_path / "run.trec.parts").iterdir())
    assert saved == ["job.json", "part-000000.trec", "part-000001.trec"] and not (tmp_path / "run.trec").exists()

    out = run(megarank_cmd(2, "rerank", str(teacher), *ARGS, "--out", "run.trec"), cwd=tmp_path).stdout
    assert "2 of 6 parts already scored; scoring the rest" in out
    assert "scored 40 pairs in" in out and "20 were already scored" in out
    assert read_scored_run(tmp_path / "run.trec") == read_scored_run(work / "one.trec")
    assert not (tmp_path / "run.trec.parts").exists()


def test_parts_of_another_job_are_refused_in_one_line(teacher, tmp_path):
    (tmp_path / "run.trec.parts").mkdir()
    (tmp_path / "run.trec.parts" / "job.json").write_text('{"top_k": 20}')
    proc = run(megarank_cmd(1, "rerank", str(teacher), *ARGS, "--out", "run.trec"), cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stdout
    errors = [ln for ln in proc.stdout.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "run.trec.parts holds the parts of another scoring job" in errors[0], proc.stdout
    assert "remove it to start over" in errors[0] and not (tmp_path / "run.trec").exists()
