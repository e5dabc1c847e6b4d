"""The training loop end to end (real `megarank train` processes, gloo on CPU, fp32, the tiny model).

- the loss goes down (Cranfield-derived groups from ../shared/data, and the built-in sample);
- every parallel layout (DP=2 with and without the distributed optimizer, TP=2, TP=2 + SP, PP=2) trains to the
  same losses, gradient norms and weights as one process, from identical initial weights, with packed
  micro-batches (the default) and with padded ones (data.packing=false, one process and TP=2);
- the NaN/Inf guard skips and counts bad steps (weights, Adam state and LR untouched) and stops after
  train.max_nonfinite_steps in a row;
- log lines, TensorBoard event files and keep-last-K pruning;
- held-out validation after every step gives the one-process values at every layout.
"""
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from tests.training_harness import (CRANFIELD, LOG_LINE, TINY, assert_bit_identical, log_lines, make_init_checkpoint,
                                    max_abs_diff, read_plain_tensors, run, run_many, tb_scalars, train_cmd)

STEPS = 3
# Same global batch everywhere (4 groups of 5 passages: 2 micro-batches of 2 on one rank, 1 per rank at DP=2).
# No warm-up, so all three steps move the weights; clip_grad 0.1 is below every step's norm, so clipping is on.
# max_length 256 leaves the sample's sequences (170-256 tokens) unequal: packed streams hold sequences of
# different lengths (and an end-padding segment), padded micro-batches (data.packing=false) carry padding, each
# to its own longest pair rounded up to a multiple of 8.
# Adam divides by |g| + eps: a gradient element that cancels to ~0 has its fp32 reduction-order noise (~1e-10)
# amplified to lr * noise / eps in the weights. eps 1e-6 (not 1e-8) keeps that far below the tolerance without
# changing any update of a gradient element that matters (|g| >> 1e-6).
# Held-out validation (megarank/training/validation.py) after every step, on 5 of the sample's JSONL groups: the
# same values at every layout, and the training unchanged by it (tests/test_validation.py).
_VALID = [f"data.valid_path={Path(__file__).resolve().parents[1] / 'megarank/resources/sample/train_groups.jsonl'}",
          "data.valid_format=jsonl", "data.valid_max_groups=5", "train.eval_interval=1"]
COMMON = [f"train.steps={STEPS}", "train.log_interval=1", "train.lr_warmup_steps=0", "train.clip_grad=0.1",
          "data.max_length=256", "train.adam_eps=1.0e-6", *_VALID]
LAYOUTS = {
    "dp2": (2, ["parallel.use_distributed_optimizer=true"]),
    "dp2_no_distributed_optimizer": (2, ["parallel.use_distributed_optimizer=false"]),
    "tp2": (2, ["parallel.tensor_model_parallel_size=2"]),
    "tp2_sp": (2, ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel.pipeline_model_parallel_size=2"]),
    "padded": (1, ["data.packing=false"]),
    "tp2_padded": (2, ["parallel.tensor_model_parallel_size=2", "data.packing=false"]),
}


def _mean(values):
    values = list(values)
    return sum(values) / len(values)


# ----------------------------------------------------------------------------------------------- parallel layouts


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory):
    """One reference run (1 process) and one run per layout, all from the same initial checkpoint."""
    work = tmp_path_factory.mktemp("layouts")
    init = make_init_checkpoint(work)
    jobs = {"reference": (1, train_cmd(1, *COMMON, f"checkpoint.load={init}", f"checkpoint.dir={work / 'reference'}"))}
    for name, (nproc, extra) in LAYOUTS.items():
        jobs[name] = (nproc, train_cmd(nproc, *COMMON, *extra, f"checkpoint.load={init}",
                                       f"checkpoint.dir={work / name}"))
    outputs = run_many(jobs, cwd=work)
    return work, outputs, init


def test_reference_run_trains_from_the_initial_checkpoint(layout_runs):
    work, outputs, init = layout_runs
    assert "initialised weights from" in outputs["reference"]
    start = read_plain_tensors(init / "model")
    end = read_plain_tensors(work / "reference" / f"step-{STEPS}" / "model")
    # every tensor moved (so agreeing on the final weights below is not agreeing on the initial ones)
    moved = {k: (end[k] - start[k]).abs().max().item() for k in start}
    assert min(moved.values()) > 1e-4, moved
    # and gradient clipping was active on every step
    assert all(norm > 0.1 for norm in tb_scalars(work / "reference" / "tensorboard", "train/grad_norm").values())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_process(layout_runs, layout):
    work, outputs, _ = layout_runs
    ref_dir, run_dir = work / "reference", work / layout
    # one log line per step, from one rank only (the last pipeline stage's first rank)
    lines = log_lines(outputs[layout])
    assert sorted(lines) == list(range(1, STEPS + 1))
    assert len(re.findall(r"step 1/\d+ \|", outputs[layout])) == 1
    for tag, rel in (("train/loss", 1e-5), ("train/grad_norm", 1e-5), ("train/lr", 1e-7), ("train/acc", 1e-7),
                     ("valid/loss", 1e-5), ("valid/mrr", 1e-6), ("valid/groups", 0)):
        ref, got = tb_scalars(ref_dir / "tensorboard", tag), tb_scalars(run_dir / "tensorboard", tag)
        assert sorted(got) == list(range(1, STEPS + 1)), tag
        for step in ref:
            assert got[step] == pytest.approx(ref[step], rel=rel, abs=1e-7), f"{tag} at step {step}"
    ref_w = read_plain_tensors(ref_dir / f"step-{STEPS}" / "model")
    got_w = read_plain_tensors(run_dir / f"step-{STEPS}" / "model")
    # Packed (2026-12-01, after the TP-attribute fix e1e9f70): losses within 7.6e-8 relative at TP=2 (step 3), grad
    # norms within 1.1e-7 everywhere; padded before it: weights 0 to 4e-9 at DP=2, 1.2e-7 at PP=2, 2.6e-7 at TP=2.
    diff, key = max_abs_diff(ref_w, got_w)
    for k in ref_w:
        torch.testing.assert_close(got_w[k], ref_w[k], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{layout} {k} after {STEPS} steps (largest: {key} {diff:.3g}): {m}")


# ----------------------------------------------------------------------------------------------- NaN/Inf guard

NAN_SCRIPT = '''
import sys

if __name__ == "__main__":
    import megarank.training.loop as loop
    from megarank.cli import main
    from megarank.training import loss as losses

    POISONED_STEPS = {2, 3, 5, 6, 7}
    calls = {"step": 0}
    real_step = loop.train_step

    def counting_step(*args, **kwargs):
        calls["step"] += 1
        return real_step(*args, **kwargs)

    def poisoned_loss(scores, relevance, teacher):
        loss = losses.group_loss("listwise", scores, relevance, teacher)
        return loss * float("nan") if calls["step"] in POISONED_STEPS else loss  # NaN loss and NaN gradients

    loop.train_step = counting_step
    loop.make_loss = lambda cfg: poisoned_loss
    sys.exit(main(["train", *sys.argv[1:]]))
'''


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path):
    (tmp_path / "nan_run.py").write_text(NAN_SCRIPT)
    run_dir = tmp_path / "run"
    proc = run([sys.executable, "nan_run.py", TINY, "train.steps=10", "train.log_interval=3", "train.lr_warmup_steps=0",
                "train.max_nonfinite_steps=3", "checkpoint.save_interval=1", "checkpoint.keep_last=0",
                f"checkpoint.dir={run_dir}"], cwd=tmp_path, check=False)
    out = proc.stdout
    # steps 2, 3 skipped; 4 finite resets the count; 5, 6, 7 in a row stop the run before step 7 is saved
    assert proc.returncode == 1
    # one clear line (no traceback) naming the limit's config key
    assert ("megarank train: error: 3 consecutive steps had NaN/Inf loss or gradients (train.max_nonfinite_steps); "
            "stopping at step 7") in out, out[-3000:]
    assert "Traceback" not in out
    # every skipped step is reported, also between log steps (log_interval 3)
    for step, in_a_row in ((2, 1), (3, 2), (5, 1), (6, 2)):
        assert f"step {step} skipped: non-finite loss or gradients ({in_a_row} in a row)" in out
    assert len(re.findall(r"step \d+ skipped", out)) == 4
    assert sorted(log_lines(out)) == [3, 6]
    tb = run_dir / "tensorboard"
    assert tb_scalars(tb, "train/skipped") == {3: 1, 6: 1}
    assert tb_scalars(tb, "train/nonfinite_skips") == {3: 2, 6: 2}
    # The cosine schedule (10 steps, no warm-up) advances only on applied steps: at step 3 it has taken one
    # step (lr(1)), at step 6 two (lr(2)); had it counted the skipped ones it would be at lr(2) and lr(5).
    lr = tb_scalars(tb, "train/lr")
    cosine = lambda n: 1e-3 * 0.5 * (1 + math.cos(math.pi * n / 10))  # noqa: E731
    assert lr[3] == pytest.approx(cosine(1), rel=1e-6) and lr[6] == pytest.approx(cosine(2), rel=1e-6), lr

    assert (run_dir / "latest").read_text().strip() == "step-6"
    weights = {s: read_plain_tensors(run_dir / f"step-{s}" / "model") for s in range(1, 7)}
    optim = {s: read_plain_tensors(run_dir / f"step-{s}" / "optimizer") for s in (1, 3, 4, 6)}
    # skipped steps leave weights and Adam state exactly as they were; finite steps move them
    assert_bit_identical(weights[1], weights[2], "weights after skipped step 2")
    assert_bit_identical(weights[1], weights[3], "weights after skipped step 3")
    assert_bit_identical(optim[1], optim[3], "optimizer state after skipped steps 2-3")
    assert max_abs_diff(weights[3], weights[4])[0] > 1e-5
    assert_bit_identical(weights[4], weights[6], "weights after skipped steps 5-6")
    assert_bit_identical(optim[4], optim[6], "optimizer state after skipped steps 5-6")
    assert torch.load(run_dir / "step-6" / "train_state" / "rank-0.pt", weights_only=True)["nonfinite"] == 2


NAN_EVAL_SCRIPT = '''
import sys

if __name__ == "__main__":
    import megarank.scoring.batched as inference
    from megarank.cli import main

    real_collect = inference._collect

    def nan_first_score(scores):  # the first candidate of every evaluation batch scores NaN
        loss, out = real_collect(scores)
        out["scores"][0] = float("nan")
        return loss, out

    inference._collect = nan_first_score
    sys.exit(main(["train", *sys.argv[1:]]))
'''


def test_nan_scores_in_evaluation_during_training_warn_and_the_run_goes_on(tmp_path):
    from megarank.data import sample_data_dir

    (tmp_path / "nan_eval.py").write_text(NAN_EVAL_SCRIPT)
    run_dir = tmp_path / "run"
    proc = run([sys.executable, "nan_eval.py", TINY, "train.steps=2", "train.log_interval=1", "train.eval_interval=1",
                f"data.eval_path={sample_data_dir()}", "data.eval_split=test", "data.eval_batch_size=16",
                f"checkpoint.dir={run_dir}"], cwd=tmp_path, check=False)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:]
    assert (run_dir / "latest").read_text().strip() == "step-2"
    for step in (1, 2):  # after step 1 (eval_interval) and the final evaluation
        warning = re.search(rf"eval step {step}: (\d+) of (\d+) candidate scores are NaN; they rank last", out)
        assert warning, out[-3000:]
        nan, total = int(warning[1]), int(warning[2])
        assert nan == -(-total // 16) and total > nan  # one per batch of 16
        assert re.search(rf"eval step {step} \| nDCG@10 \d\.\d+", out), out[-3000:]
    values = tb_scalars(run_dir / "tensorboard", "eval/nDCG@10")
    assert sorted(values) == [1, 2] and all(0.0 <= v <= 1.0 for v in values.values())


# ----------------------------------------------------------------------------------------------- learning


def _cranfield_slice(dest: Path, n_queries: int, top_k: int) -> Path:
    """The first n training queries of Cranfield with their judgements, BM25 top-k and the documents these
    name, in the same BEIR layout (so the run file is found the usual way)."""
    for sub in ("qrels", "candidates"):
        (dest / sub).mkdir(parents=True)
    qrels = (CRANFIELD / "qrels" / "train.tsv").read_text().splitlines()
    keep: list[str] = []
    for line in qrels[1:]:
        qid = line.split("\t")[0]
        if qid not in keep and len(keep) < n_queries:
            keep.append(qid)
    qrel_rows = [line for line in qrels[1:] if line.split("\t")[0] in keep]
    (dest / "qrels" / "train.tsv").write_text("\n".join([qrels[0], *qrel_rows]) + "\n")
    run_lines = (CRANFIELD / "candidates" / "train.bm25.top100.tsv").read_text().splitlines()
    run_rows = [ln for ln in run_lines[1:] if ln.split("\t")[0] in keep and int(ln.split("\t")[2]) <= top_k]
    (dest / "candidates" / "train.bm25.top100.tsv").write_text("\n".join([run_lines[0], *run_rows]) + "\n")
    docs = {ln.split("\t")[1] for ln in run_rows + qrel_rows}
    with open(CRANFIELD / "corpus.jsonl") as f:
        (dest / "corpus.jsonl").write_text("".join(ln for ln in f if json.loads(ln)["_id"] in docs))
    with open(CRANFIELD / "queries.jsonl") as f:
        (dest / "queries.jsonl").write_text("".join(ln for ln in f if json.loads(ln)["_id"] in keep))
    return dest


# Scores divided by temperature 0.1 and a constant lr let a 64-wide random model visibly fit in a few dozen steps.
LEARN = ["train.log_interval=1", "train.lr=0.001", "train.lr_decay_style=constant", "model.temperature=0.1"]


def _first_and_last(lines: dict, field: str, k: int):
    steps = sorted(lines)
    return _mean(float(lines[s][field]) for s in steps[:k]), _mean(float(lines[s][field]) for s in steps[-k:])


@pytest.mark.skipif(not (CRANFIELD / "corpus.jsonl").is_file(),
                    reason=f"Cranfield is not at {CRANFIELD} (../shared/data)")
def test_loss_goes_down_on_cranfield_groups(tmp_path):
    # 16 training queries with BM25 top-30 hard negatives. The byte-level tiny tokenizer spends ~110 tokens on
    # the query and template, so max_length 256 keeps a passage in every sequence.
    data = _cranfield_slice(tmp_path / "cranfield16", n_queries=16, top_k=30)
    steps = 40
    out = run(train_cmd(1, *LEARN, f"data.train_path={data}", "data.train_split=train", "data.max_length=256",
                        "data.negatives_top_k=30", "train.global_batch_size=8", "train.micro_batch_size=4",
                        f"train.steps={steps}"), cwd=tmp_path).stdout
    assert "16 training groups" in out
    lines = log_lines(out)
    assert sorted(lines) == list(range(1, steps + 1))
    first, last = _first_and_last(lines, "loss", 10)
    assert last < first - 0.05, f"mean loss of the first 10 steps {first:.4f}, of the last 10 {last:.4f}"
    acc_first, acc_last = _first_and_last(lines, "acc", 10)
    assert acc_last > acc_first, f"group accuracy {acc_first:.3f} -> {acc_last:.3f}"


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    """24 steps on the built-in sample with checkpoints every 5 steps and keep_last 2."""
    work = tmp_path_factory.mktemp("sample-run")
    out = run(train_cmd(1, *LEARN, "train.steps=24", "checkpoint.save_interval=5", "checkpoint.keep_last=2",
                        f"checkpoint.dir={work / 'run'}"), cwd=work).stdout
    return work / "run", out


def test_loss_goes_down_on_the_builtin_sample(sample_run):
    _, out = sample_run
    lines = log_lines(out)
    assert sorted(lines) == list(range(1, 25))
    first, last = _first_and_last(lines, "loss", 6)
    assert last < first - 0.2, f"mean loss of the first 6 steps {first:.4f}, of the last 6 {last:.4f}"
    acc_first, acc_last = _first_and_last(lines, "acc", 6)
    assert acc_last > acc_first, f"group accuracy {acc_first:.3f} -> {acc_last:.3f}"


def test_log_line_and_tensorboard_event_files(sample_run):
    run_dir, out = sample_run
    line = next(ln for ln in out.splitlines() if "step 24/24" in ln)
    m = LOG_LINE.search(line)
    assert m, line
    for field in ("loss", "acc", "mrr", "lr", "grad_norm", "tps"):
        float(m[field])
    assert float(m["tps"]) > 0 and float(m["lr"]) == pytest.approx(1e-3)
    # MFU: model FLOPs of the real tokens over the CPU's measured fp32 GEMM peak (a share, not a speed)
    mfu = float(m["mfu"].rstrip("%"))
    assert 0.0 < mfu < 100.0 and "MFU = model FLOPs of the real (non-padding) tokens" in out
    assert tb_scalars(run_dir / "tensorboard", "train/mfu")[24] == pytest.approx(mfu / 100, abs=6e-4)
    assert re.fullmatch(r"\d+:\d\d:\d\d", m["elapsed"]) and m["eta"] == "0:00:00"
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file in <checkpoint.dir>/tensorboard"
    for tag in ("loss", "acc", "mrr", "lr", "grad_norm", "tokens_per_s", "mfu", "data_wait"):
        values = tb_scalars(run_dir / "tensorboard", f"train/{tag}")
        assert sorted(values) == list(range(1, 25)), tag
    # the seconds the step waited for its batches (built on a worker thread during the step before)
    wait = re.search(r"\| data wait (\d+\.\d) ms$", line)
    assert wait and tb_scalars(run_dir / "tensorboard", "train/data_wait")[24] == pytest.approx(
        float(wait[1]) / 1000, abs=6e-5)
    # the event file holds the loss the log line printed, at full precision
    assert tb_scalars(run_dir / "tensorboard", "train/loss")[24] == pytest.approx(float(m["loss"]), abs=5e-5)


def test_checkpoints_keep_the_last_k_and_latest_names_the_final_step(sample_run):
    run_dir, _ = sample_run
    steps = sorted(p.name for p in run_dir.glob("step-*"))
    assert steps == ["step-20", "step-24"], steps
    assert (run_dir / "latest").read_text().strip() == "step-24"
    assert not list(run_dir.glob(".step-*")), "no incomplete folder is left after clean saves"
    final = run_dir / "step-24"
    marker = json.loads((final / "megarank_checkpoint.json").read_text())
    assert marker["kind"] == "train" and marker["step"] == 24
    for part in ("config.yaml", "model/metadata.json", "optimizer/metadata.json", "train_state/rank-0.pt",
                 "tokenizer"):
        assert (final / part).exists(), part
    state = torch.load(final / "train_state" / "rank-0.pt", weights_only=True)
    assert state["step"] == 24 and state["nonfinite"] == 0
