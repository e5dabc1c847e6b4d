"""Checkpoint, kill, resume: real `megarank train` processes on CPU (gloo, fp32, the tiny model and sample data).

- SIGKILL after `latest` names step N, resume to 2N: the same per-step losses and bit-identical weights and
  optimizer state as 2N steps straight (one process; DP=2 with the distributed optimizer; and DP=2 with packed
  token-budget micro-batches, whose split differs per step and per rank);
- a kill in the middle of saving step 2N leaves `latest` on step N, which is complete and resumes exactly;
- a checkpoint saved at TP=2 resumes at TP=1, DP=2, PP=2 and CP=2 with its weights and optimizer state, and the
  resume log names the layout change; a CP=2 checkpoint resumes at CP=1;
- SIGTERM, SIGUSR1 and the `.save_and_exit` file save at a step boundary and exit 0;
- the same kill and resume with each loss beyond listwise, teacher scores (a BEIR teacher run, JSONL
  pos_scores/neg_scores) and several graded positives per group, and from a data.blend of two sources at DP=2
  (a quarter of each held out by data.valid_fraction and validated every other step: the same held-out groups and
  validation losses after the resume).
"""
import json
import shutil
import signal
import subprocess

import pytest
import torch

from tests.training_harness import (REPO, TINY, all_stopped, assert_bit_identical, kill_tree, log_lines, max_abs_diff,
                                    read_plain_tensors, run, run_env, run_many, script_cmd, tb_scalars, train_cmd,
                                    wait_for)

N = 3
RESUME = [f"train.steps={2 * N}", f"checkpoint.save_interval={N}", "checkpoint.keep_last=0", "train.log_interval=1"]


def _latest(run_dir) -> str:
    path = run_dir / "latest"
    return path.read_text().strip() if path.is_file() else ""


def _complete(step_dir, step: int) -> None:
    marker = json.loads((step_dir / "megarank_checkpoint.json").read_text())
    assert marker["kind"] == "train" and marker["step"] == step, marker
    for part in ("config.yaml", "model/metadata.json", "optimizer/metadata.json", "train_state/rank-0.pt"):
        assert (step_dir / part).exists(), f"{step_dir} lacks {part}"


def _assert_same_run(straight_dir, resumed_dir, resumed_tb, steps) -> None:
    """Per-step float32 losses/grad norms/lr equal, and bit-identical final weights and optimizer state."""
    for tag in ("train/loss", "train/grad_norm", "train/lr"):
        want = tb_scalars(straight_dir / "tensorboard", tag)
        got = tb_scalars(resumed_tb, tag)
        assert sorted(got) == list(steps), f"{tag}: the resumed run logged steps {sorted(got)}"
        assert {s: got[s] for s in steps} == {s: want[s] for s in steps}, tag
    want = tb_scalars(straight_dir / "tensorboard", "valid/loss")  # held-out validation, where the run has it
    if want:
        got = tb_scalars(resumed_tb, "valid/loss")
        assert got and got == {s: want[s] for s in got}, "valid/loss"
    final = f"step-{steps[-1]}"
    assert_bit_identical(read_plain_tensors(straight_dir / final / "model"),
                         read_plain_tensors(resumed_dir / final / "model"), "weights")
    assert_bit_identical(read_plain_tensors(straight_dir / final / "optimizer"),
                         read_plain_tensors(resumed_dir / final / "optimizer"), "optimizer state")


# train.micro_batch_tokens 2000 on the sample's groups (about 850-1280 packed tokens each, 2 per DP rank): one
# rank's step is sometimes 1 micro-batch of 2 groups, sometimes 2 of 1 (loss weights 1.0 and 0.5 x 2), and the
# two ranks differ (step 1: 2 micro-batches on rank 0, 1 on rank 1).
# Each loss beyond listwise, with teacher scores ({teacher}: a BEIR teacher run and JSONL groups with
# pos_scores/neg_scores, written by the `teacher` fixture) and several graded positives per group.
_BEIR_TEACHER = ["data.teacher_run={teacher}/teacher.trec"]
_JSONL_TEACHER = ["data.format=jsonl", "data.train_path={teacher}/groups.jsonl"]
_TWO_POSITIVES = ["data.positives_per_group=2"]
# A blend of the sample's JSONL groups (12, weight 3) and its BEIR train split (weight 1): both sources cycle on
# their own epochs within the 6 steps (braces doubled for str.format).
_SAMPLE = REPO / "megarank" / "resources" / "sample"
_BLEND = (f"data.blend=[{{{{path: {_SAMPLE / 'train_groups.jsonl'}, format: jsonl, weight: 3}}}}, "
          f"{{{{path: {_SAMPLE}, format: beir, weight: 1}}}}]")
RESUME_LAYOUTS = {
    "one": (1, []),
    "dp2": (2, ["parallel.use_distributed_optimizer=true"]),
    "budget_dp2": (2, ["parallel.use_distributed_optimizer=true", "train.micro_batch_tokens=2000", "data.packing=true"]),
    "kl_dp2": (2, ["train.loss=kl", "train.teacher_temperature=2", "train.distill_weight=0.5", *_BEIR_TEACHER,
                   *_TWO_POSITIVES, "parallel.use_distributed_optimizer=true"]),
    "margin_mse": (1, ["train.loss=margin_mse", *_JSONL_TEACHER]),
    "mse": (1, ["train.loss=mse", *_BEIR_TEACHER]),
    "listnet": (1, ["train.loss=listnet", *_TWO_POSITIVES]),
    "plistmle": (1, ["train.loss=plistmle", *_TWO_POSITIVES]),
    "lambda": (1, ["train.loss=lambda", *_JSONL_TEACHER, *_TWO_POSITIVES]),
    "ranknet": (1, ["train.loss=ranknet", *_TWO_POSITIVES]),
    # ... with a quarter of each source held out and validated every other step (megarank/training/validation.py)
    "blend_dp2": (2, [_BLEND, "parallel.use_distributed_optimizer=true", "data.valid_fraction=0.25",
                      "train.eval_interval=2"]),
    # Context parallelism: each sequence split over the two ranks (one data-parallel replica), packed token-budget
    # micro-batches (each sequence padded to 4 inside the stream), the distributed optimizer over the CP ranks.
    "cp2": (2, ["parallel.context_parallel_size=2", "parallel.use_distributed_optimizer=true",
                "train.micro_batch_tokens=2000", "data.packing=true"]),
}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """Teacher scores for the sample data: a scored run of its train split (every candidate and judged document)
    and its JSONL groups with pos_scores/neg_scores and graded pos_labels (scores made up, deterministic)."""
    from megarank.data import find_run_file, read_beir, read_run, sample_data_dir

    folder = tmp_path_factory.mktemp("teacher")
    beir, run = read_beir(sample_data_dir(), "train"), read_run(find_run_file(sample_data_dir(), "train"))
    with open(folder / "teacher.trec", "w") as f:
        for qid, docs in run.items():
            for rank, d in enumerate(dict.fromkeys(docs + sorted(beir.qrels.get(qid, {}))), start=1):
                f.write(f"{qid} Q0 {d} {rank} {3.0 * beir.qrels.get(qid, {}).get(d, 0) - 0.1 * rank!r} teacher\n")
    with open(sample_data_dir() / "train_groups.jsonl") as src, open(folder / "groups.jsonl", "w") as f:
        for line in src:
            g = json.loads(line)
            g["pos_scores"] = [5.0 - i for i in range(len(g["pos_doc"]))]
            g["neg_scores"] = [0.5 * ((i * 7) % 5) - 1.0 for i in range(len(g["neg_doc"]))]
            g["pos_labels"] = [2] + [1] * (len(g["pos_doc"]) - 1)
            f.write(json.dumps(g) + "\n")
    return folder


def _extra(layout: str, teacher) -> list[str]:
    return [o.format(teacher=teacher) for o in RESUME_LAYOUTS[layout][1]]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, teacher):
    """2N steps without interruption at each of RESUME_LAYOUTS."""
    work = tmp_path_factory.mktemp("straight")
    run_many({name: (nproc, train_cmd(nproc, *RESUME, *_extra(name, teacher), f"checkpoint.dir={work / name}"))
              for name, (nproc, _) in RESUME_LAYOUTS.items()}, cwd=work)
    return {name: work / name for name in RESUME_LAYOUTS}


FREEZE = '''
import os
import signal
import sys

if __name__ == "__main__":  # the torch_dist writer starts a spawn Manager: guard the main module
    from megatron.core import dist_checkpointing

    import megarank.training.loop as loop
    from megarank.cli import main

    # Stop this rank (SIGSTOP) at a chosen point, for the test to SIGKILL the whole job there:
    #   step:K        before training step K (K-1 steps done, the last save before it is complete)
    #   save:SUBSTR   right after the dist_checkpointing.save whose path contains SUBSTR
    where, _, what = sys.argv[1].partition(":")
    real_step, real_save, steps = loop.train_step, dist_checkpointing.save, [0]

    def step_or_freeze(*args, **kwargs):
        steps[0] += 1
        if where == "step" and steps[0] == int(what):
            os.kill(os.getpid(), signal.SIGSTOP)
        return real_step(*args, **kwargs)

    def save_then_freeze(state_dict, path, *args, **kwargs):
        result = real_save(state_dict, path, *args, **kwargs)
        if where == "save" and what in str(path):
            os.kill(os.getpid(), signal.SIGSTOP)
        return result

    loop.train_step, dist_checkpointing.save = step_or_freeze, save_then_freeze
    sys.exit(main(["train", *sys.argv[2:]]))
'''


def _sigkill_at(tmp_path, nproc: int, point: str, *overrides: str) -> subprocess.Popen:
    """Run `megarank train` under FREEZE until every rank stopped at ``point``, then SIGKILL the whole job."""
    (tmp_path / "freeze.py").write_text(FREEZE)
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(script_cmd(nproc, "freeze.py", point, TINY, *overrides), cwd=tmp_path, env=run_env(),
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: all_stopped(proc, nproc, "freeze.py"), 240, f"every rank stopped at {point}", proc)
        finally:
            kill_tree(proc)  # torchrun and its ranks (each in a session of its own) alike
    assert proc.returncode == -signal.SIGKILL
    return proc


@pytest.mark.parametrize("layout", list(RESUME_LAYOUTS), ids=["1-process", "dp2-distributed-optimizer",
                                                                "dp2-packed-token-budget", *list(RESUME_LAYOUTS)[3:]])
def test_sigkill_after_step_n_then_resume_matches_training_straight(straight, teacher, tmp_path, layout):
    nproc, extra = RESUME_LAYOUTS[layout][0], _extra(layout, teacher)
    run_dir = tmp_path / "run"
    # Killed in the middle of steps N+1..2N: step N+1 trained (and logged), nothing after step N saved.
    _sigkill_at(tmp_path, nproc, f"step:{N + 2}", *RESUME, *extra, f"checkpoint.dir={run_dir}",
                f"logging.tensorboard_dir={tmp_path / 'tb-killed'}")
    assert sorted(tb_scalars(tmp_path / "tb-killed", "train/loss")) == list(range(1, N + 2))
    assert _latest(run_dir) == f"step-{N}"
    _complete(run_dir / f"step-{N}", N)

    out = run(train_cmd(nproc, *RESUME, *extra, f"checkpoint.dir={run_dir}",
                        f"logging.tensorboard_dir={tmp_path / 'tb-resumed'}"), cwd=tmp_path).stdout
    assert f"resumed from {run_dir / f'step-{N}'} at step {N}\n" in out  # same layout: nothing more to say
    assert sorted(log_lines(out)) == list(range(N + 1, 2 * N + 1))
    _assert_same_run(straight[layout], run_dir, tmp_path / "tb-resumed", list(range(N + 1, 2 * N + 1)))
    assert not list(run_dir.glob(".step-*")), "a completed save leaves no incomplete folder behind"


def test_kill_during_a_save_leaves_latest_on_the_previous_complete_checkpoint(straight, tmp_path):
    run_dir = tmp_path / "run"
    partial = run_dir / f".step-{2 * N}.incomplete"
    # Killed after the model shards of step 2N were written, before its optimizer state, train state and marker.
    _sigkill_at(tmp_path, 1, f"save:{partial.name}/model", *RESUME, f"checkpoint.dir={run_dir}")
    assert f"step {2 * N}/{2 * N}" in (tmp_path / "killed.log").read_text(), "killed before the last step"
    assert _latest(run_dir) == f"step-{N}"
    _complete(run_dir / f"step-{N}", N)
    assert (partial / "model" / "metadata.json").is_file() and not (partial / "megarank_checkpoint.json").exists()
    assert not (run_dir / f"step-{2 * N}").exists()

    # Resuming takes step N (not the half-written folder), redoes N+1..2N exactly and cleans up.
    out = run(train_cmd(1, *RESUME, f"checkpoint.dir={run_dir}",
                        f"logging.tensorboard_dir={tmp_path / 'tb-resumed'}"), cwd=tmp_path).stdout
    assert f"resumed from {run_dir / f'step-{N}'} at step {N}" in out
    _assert_same_run(straight["one"], run_dir, tmp_path / "tb-resumed", list(range(N + 1, 2 * N + 1)))
    assert not partial.exists() and _latest(run_dir) == f"step-{2 * N}"


# ----------------------------------------------------------------------------------------------- another layout

# Padding in the batches (max_length 256; PP pads to the full length) and Adam eps 1e-6, as in
# test_training.py's layout comparison (eps keeps reduction-order noise in ~0 gradients from being amplified).
LAYOUT_STEPS = [f"train.steps={2 * N}", f"checkpoint.save_interval={N}", "checkpoint.keep_last=0",
                "train.log_interval=1", "train.lr_warmup_steps=0", "data.max_length=256", "train.adam_eps=1.0e-6"]
TARGETS = {
    "tp1": (1, []),
    "dp2": (2, ["parallel.use_distributed_optimizer=true"]),
    "pp2": (2, ["parallel.pipeline_model_parallel_size=2"]),
    "cp2": (2, ["parallel.context_parallel_size=2"]),
}


@pytest.fixture(scope="module")
def resharded(tmp_path_factory):
    """2N steps at TP=2; then step N of it resumed to 2N at TP=1 (1 process), DP=2, PP=2 and CP=2."""
    work = tmp_path_factory.mktemp("reshard")
    source = work / "tp2"
    run(train_cmd(2, *LAYOUT_STEPS, "parallel.tensor_model_parallel_size=2", f"checkpoint.dir={source}"), cwd=work)
    jobs = {}
    for name, (nproc, extra) in TARGETS.items():
        run_dir = work / name
        run_dir.mkdir()
        shutil.copytree(source / f"step-{N}", run_dir / f"step-{N}")
        (run_dir / "latest").write_text(f"step-{N}\n")
        jobs[name] = (nproc, train_cmd(nproc, *LAYOUT_STEPS, *extra, f"checkpoint.dir={run_dir}"))
    return work, run_many(jobs, cwd=work)


@pytest.mark.parametrize("target", list(TARGETS))
def test_checkpoint_saved_at_tp2_resumes_at_another_layout(resharded, target):
    work, outputs = resharded
    source, run_dir = work / "tp2", work / target
    now = {"tp1": "TP=1 PP=1 CP=1 DP=1", "dp2": "TP=1 PP=1 CP=1 DP=2", "pp2": "TP=1 PP=2 CP=1 DP=1",
           "cp2": "TP=1 PP=1 CP=2 DP=1"}[target]
    # the resume says what it did: the step, and the layout change
    assert (f"resumed from {run_dir / f'step-{N}'} at step {N} (saved at TP=2 PP=1 CP=1 DP=1, now {now}: "
            "weights and optimizer state resharded)") in outputs[target]
    steps = list(range(N + 1, 2 * N + 1))
    want = tb_scalars(source / "tensorboard", "train/loss")
    got = tb_scalars(run_dir / "tensorboard", "train/loss")
    assert sorted(got) == steps
    # Step N+1's loss is computed with the loaded weights only: they arrived intact.
    assert got[N + 1] == pytest.approx(want[N + 1], rel=1e-6, abs=1e-7)
    # Later steps use the restored Adam moments and step counts (a fresh optimizer takes a different step).
    for s in steps[1:]:
        assert got[s] == pytest.approx(want[s], rel=1e-5, abs=1e-6), f"loss at step {s}"
    want_w = read_plain_tensors(source / f"step-{2 * N}" / "model")
    got_w = read_plain_tensors(run_dir / f"step-{2 * N}" / "model")
    diff, key = max_abs_diff(want_w, got_w)
    for k in want_w:
        torch.testing.assert_close(got_w[k], want_w[k], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{target} {k} (largest: {key} {diff:.3g}): {m}")


def test_checkpoint_saved_at_cp2_resumes_at_cp1(straight, tmp_path):
    """Step N of the CP=2 run resumed in one process: the log names the change, and step N+1's loss (computed with
    the loaded weights) and the later steps' (restored Adam state) follow the CP=2 run's."""
    source, run_dir = straight["cp2"], tmp_path / "cp1"
    run_dir.mkdir()
    shutil.copytree(source / f"step-{N}", run_dir / f"step-{N}")
    (run_dir / "latest").write_text(f"step-{N}\n")
    out = run(train_cmd(1, *RESUME, "parallel.use_distributed_optimizer=true", "train.micro_batch_tokens=2000",
                        "data.packing=true", f"checkpoint.dir={run_dir}"), cwd=tmp_path).stdout
    assert "(saved at TP=1 PP=1 CP=2 DP=1, now TP=1 PP=1 CP=1 DP=1: weights and optimizer state resharded)" in out
    want = tb_scalars(source / "tensorboard", "train/loss")
    got = tb_scalars(run_dir / "tensorboard", "train/loss")
    assert sorted(got) == list(range(N + 1, 2 * N + 1))
    assert got[N + 1] == pytest.approx(want[N + 1], rel=1e-5, abs=1e-6)
    for s in range(N + 2, 2 * N + 1):
        assert got[s] == pytest.approx(want[s], rel=1e-3, abs=1e-5), f"loss at step {s}"


# ----------------------------------------------------------------------------------------------- preemption

STOP_FILE = ".save_and_exit"


def _preempt(tmp_path, run_dir, name: str, request, after_step: int):
    """Start a long run in run_dir, wait until it logged ``after_step``, request a stop; -> (rc, output)."""
    log_path = tmp_path / f"{name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(train_cmd(1, "train.steps=400", "train.log_interval=1", "checkpoint.save_interval=0",
                                          f"checkpoint.dir={run_dir}"),
                                cwd=tmp_path, env=run_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            wait_for(lambda: f"step {after_step}/400" in log_path.read_text(), 240, f"step {after_step}", proc)
            request(proc)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                kill_tree(proc)
    return proc.returncode, log_path.read_text()


def _saved_step(out: str) -> int:
    lines = [ln for ln in out.splitlines() if "preempted: saved step" in ln]
    assert len(lines) == 1, out[-3000:]
    return int(lines[0].rsplit(" ", 1)[1])


def test_sigterm_sigusr1_and_the_stop_file_save_at_a_step_boundary_and_exit_0(tmp_path):
    run_dir = tmp_path / "run"
    previous = 0
    requests = [
        ("sigterm", lambda p: p.send_signal(signal.SIGTERM)),
        ("sigusr1", lambda p: p.send_signal(signal.SIGUSR1)),
        ("stop-file", lambda p: (run_dir / STOP_FILE).touch()),
    ]
    for name, request in requests:
        rc, out = _preempt(tmp_path, run_dir, name, request, after_step=previous + 2)
        assert rc == 0, f"{name}: exit {rc}\n{out[-3000:]}"
        if previous:
            assert f"resumed from {run_dir / f'step-{previous}'} at step {previous}" in out, name
        step = _saved_step(out)
        assert step >= previous + 2, f"{name}: saved step {step} before the step it was asked at"
        # it stopped at that step boundary: nothing after it was trained or logged
        assert max(log_lines(out)) == step, name
        assert _latest(run_dir) == f"step-{step}", name
        _complete(run_dir / f"step-{step}", step)
        assert not (run_dir / STOP_FILE).exists(), f"{name}: the stop file must be removed after the save"
        previous = step
