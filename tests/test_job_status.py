"""launch/slurm/job_status.sh: the last line of a train.sbatch job log says what happened, for every way a job ends
(the end-to-end SLURM runs in test_slurm.py check the finished and preempted lines as a real job prints them)."""
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "slurm" / "job_status.sh"


def status(rc, preempted=0, terminated=0, ckpt="", logs="") -> str:
    cmd = f'source "{SCRIPT}"; job_status_line "$@"'
    proc = subprocess.run(["bash", "-c", cmd, "status", str(rc), str(preempted), str(terminated), str(ckpt), str(logs)],
                          capture_output=True, text=True, env={"SLURM_JOB_ID": "77", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def ckpt(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "latest").write_text("step-120\n")
    return tmp_path / "ckpt"


def test_finished_preempted_and_stopped_name_the_latest_step(ckpt):
    assert status(0, ckpt=ckpt) == f"=== megarank job 77: FINISHED (latest checkpoint: step 120 ({ckpt}/step-120))"
    line = status(0, preempted=1, ckpt=ckpt)
    assert line.startswith("=== megarank job 77: PREEMPTED at the time-limit warning (USR1); saved and requeued")
    assert line.endswith("(latest checkpoint: step 120 (" + str(ckpt) + "/step-120))")
    for rc, term in ((0, 1), (143, 0), (143, 1)):
        line = status(rc, terminated=term, ckpt=ckpt)
        assert "STOPPED by SIGTERM" in line and "submit the same command to resume" in line and "step 120" in line, line
    assert "STOPPED by SIGINT (exit 130" in status(130, ckpt=ckpt)


def test_a_failure_names_the_last_error_any_rank_printed(ckpt, tmp_path):
    logs = tmp_path / "logs" / "job" / "attempt_0"
    for rank, text in (("0", "step 3/20 loss 1.2\n"),
                       ("1", "Traceback (most recent call last):\n  File x\nRuntimeError: CUDA out of memory\n")):
        (logs / rank).mkdir(parents=True)
        (logs / rank / "stderr.log").write_text(text)
    line = status(1, ckpt=ckpt, logs=tmp_path / "logs")
    assert line == (f"=== megarank job 77: FAILED with exit code 1: RuntimeError: CUDA out of memory "
                    f"(latest checkpoint: step 120 ({ckpt}/step-120))")
    (logs / "0" / "stderr.log").write_text("[default0]:megarank train: error: data.train_path x.jsonl does not exist\n")
    line = status(2, ckpt=ckpt, logs=tmp_path / "logs")  # megarank's own one-line error wins over a traceback's
    assert "FAILED with exit code 2: megarank train: error: data.train_path x.jsonl does not exist" in line, line


def test_no_checkpoint_and_no_logs_are_said_not_guessed(tmp_path):
    assert status(0) == "=== megarank job 77: FINISHED (no checkpoint.dir: nothing saved)"
    (tmp_path / "empty").mkdir()
    assert status(0, ckpt=tmp_path / "empty").endswith(f"(no checkpoint saved in {tmp_path / 'empty'})")
    assert "FAILED with exit code 1: no error line in" in status(1, ckpt=tmp_path / "empty", logs=tmp_path / "none")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "latest").write_text("garbage")
    assert status(0, ckpt=tmp_path / "bad").endswith("(no checkpoint saved in " + str(tmp_path / "bad") + ")")
