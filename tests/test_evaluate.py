"""`megarank evaluate` on the built-in sample BEIR folder at 1 process, TP=2 and PP=2, and evaluation during
training (real processes, gloo on CPU, fp32)."""
import json
import math

import pytest

from megarank.data import read_beir, read_run, sample_data_dir
from megarank.scoring.metrics import evaluate_run, read_trec_run
from tests.training_harness import megarank_cmd, run, run_many, tb_scalars, train_cmd

SAMPLE = sample_data_dir()
METRICS = {"nDCG@10", "RR@10", "MRR@10", "R@10", "R@100"}
LAYOUTS = {"one": (1, []), "tp2": (2, ["parallel.tensor_model_parallel_size=2"]),
           "pp2": (2, ["parallel.pipeline_model_parallel_size=2"])}
# Exact comparisons run in fp32 (--dtype auto picks bf16 on CPUs with native bf16 matmuls). "fixed": today's
# fixed batches of 5 pairs against the default token budget of "one"; "bf16": the smoke run of --dtype bf16.
FLAGS = {"one": ["--dtype", "fp32"], "tp2": ["--dtype", "fp32"], "pp2": ["--dtype", "fp32"],
         "fixed": ["--dtype", "fp32", "--batch-tokens", "0", "--batch-size", "5"], "bf16": ["--dtype", "bf16"]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two training steps with evaluation on the sample's test split after each (eval_interval=1)."""
    work = tmp_path_factory.mktemp("trained")
    out = run(train_cmd(1, "train.steps=2", "train.log_interval=1", "train.eval_interval=1",
                        f"data.eval_path={SAMPLE}", "data.eval_split=test", f"checkpoint.dir={work / 'run'}"),
              cwd=work).stdout
    return work / "run", out


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
    """The trained checkpoint evaluated at each layout; the 1-process run is given the run folder (`latest`)."""
    run_dir, _ = trained
    work = tmp_path_factory.mktemp("evaluate")
    jobs = {}
    for name, (nproc, overrides) in {**LAYOUTS, "fixed": (1, []), "bf16": (1, [])}.items():
        target = run_dir if name == "one" else run_dir / "step-2"
        # Config overrides go right after the checkpoint (argparse takes them as the positional list there).
        # max_length 256: the sample's pairs are of unequal length below it, so batches carry padding (each
        # batch to its own longest pair, rounded up to a multiple of 8, on every layout).
        overrides = ["data.max_length=256", *overrides]
        jobs[name] = (nproc, megarank_cmd(nproc, "evaluate", str(target), *overrides, "--data", str(SAMPLE),
                                          "--split", "test", "--out", f"{name}.trec", "--metrics-out", f"{name}.json",
                                          *FLAGS[name]))
    # rerank --top-k 20: the recall cut-off is named after the 20 candidates reranked (R@20, not R@100)
    jobs["top20"] = (1, megarank_cmd(1, "rerank", str(run_dir), "--data", str(SAMPLE), "--split", "test", "--top-k",
                                     "20", "--out", "top20.trec", "--metrics-out", "top20.json", "--dtype", "fp32"))
    outputs = run_many(jobs, cwd=work)
    return work, outputs, run_dir / "step-2"


def test_evaluation_during_training_logs_eval_lines_and_tensorboard_scalars(trained):
    run_dir, out = trained
    for step in (1, 2):
        line = next((ln for ln in out.splitlines() if f"eval step {step} |" in ln), None)
        assert line is not None, f"no `eval step {step}` line:\n{out[-3000:]}"
        assert "nDCG@10" in line and "MRR@10" in line and "first stage:" in line
    values = tb_scalars(run_dir / "tensorboard", "eval/nDCG@10")
    assert sorted(values) == [1, 2] and all(0.0 <= v <= 1.0 for v in values.values())


def test_evaluate_writes_a_run_file_and_metrics_for_megarank_and_the_first_stage(evaluated):
    work, outputs, step_dir = evaluated
    report = json.loads((work / "one.json").read_text())
    assert report["checkpoint"] == str(step_dir), "the run folder resolves to the step `latest` names"
    assert report["split"] == "test" and report["top_k"] == 100
    beir = read_beir(str(SAMPLE), "test")
    candidates = read_run(str(SAMPLE / "candidates" / "test.run.tsv"))
    judged = [q for q in candidates if q in beir.qrels]
    assert report["queries"] == len(judged) > 0
    for system in ("megarank", "first_stage"):
        assert set(report[system]) == METRICS, system
        assert all(0.0 <= v <= 1.0 for v in report[system].values()), report[system]
        assert report[system]["MRR@10"] == report[system]["RR@10"]
    # the printed report is the file's
    assert json.loads(outputs["one"].strip().splitlines()[-1]) == report

    scores = read_trec_run(work / "one.trec")
    # every candidate of every judged query is scored once
    assert {q: set(d) for q, d in scores.items()} == {q: set(candidates[q]) for q in judged}
    # the reported metrics are those of the written run
    recomputed = evaluate_run(beir.qrels, scores)
    for name in METRICS:
        assert report["megarank"][name] == pytest.approx(recomputed[name], abs=1e-12), name
    # and the written run is ranked: descending scores within each query
    lines = (work / "one.trec").read_text().splitlines()
    by_query: dict = {}
    for ln in lines:
        qid, _, _, rank, score, tag = ln.split()
        assert tag == "megarank" and math.isfinite(float(score))
        by_query.setdefault(qid, []).append((int(rank), float(score)))
    for ranked in by_query.values():
        assert [r for r, _ in ranked] == list(range(1, len(ranked) + 1))
        assert all(a[1] >= b[1] for a, b in zip(ranked, ranked[1:]))


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_evaluate_gives_the_same_scores_at_tp2_and_pp2(evaluated, layout):
    work, _, step_dir = evaluated
    ref, got = read_trec_run(work / "one.trec"), read_trec_run(work / f"{layout}.trec")
    assert {q: set(d) for q, d in got.items()} == {q: set(d) for q, d in ref.items()}
    worst = max(abs(got[q][d] - ref[q][d]) for q in ref for d in ref[q])
    assert worst < 1e-5, f"{layout}: a score differs by {worst:.3g} from one process"
    spread = max(s for d in ref.values() for s in d.values()) - min(s for d in ref.values() for s in d.values())
    assert spread > 1e-3, "scores must differ between documents for this comparison to mean something"
    report, ref_report = (json.loads((work / f"{n}.json").read_text()) for n in (layout, "one"))
    assert report["checkpoint"] == str(step_dir)
    for system in ("megarank", "first_stage"):
        for name in METRICS:
            assert report[system][name] == pytest.approx(ref_report[system][name], abs=1e-9), (system, name)


def test_evaluate_reports_dtype_and_batching_and_budget_batches_give_the_fixed_batches_scores(evaluated):
    work, outputs, _ = evaluated
    one, fixed, bf16 = (json.loads((work / f"{n}.json").read_text()) for n in ("one", "fixed", "bf16"))
    assert (one["dtype"], one["dtype_reason"]) == ("fp32", "requested")
    assert (one["batch_tokens"], one["batch_size"]) == (16384, None), "the default: a token budget, no pair bound"
    assert (fixed["batch_tokens"], fixed["batch_size"]) == (0, 5)
    assert "scoring in fp32 (requested)" in outputs["one"]
    ref, got = read_trec_run(work / "one.trec"), read_trec_run(work / "fixed.trec")
    assert {q: set(d) for q, d in got.items()} == {q: set(d) for q, d in ref.items()}
    assert max(abs(got[q][d] - ref[q][d]) for q in ref for d in ref[q]) <= 1e-6
    # bf16 smoke: it ran in bf16, said so, and ranks like fp32 up to bf16 rounding
    assert (bf16["dtype"], bf16["dtype_reason"]) == ("bf16", "requested")
    low = read_trec_run(work / "bf16.trec")
    worst = max(abs(low[q][d] - ref[q][d]) for q in ref for d in ref[q])
    scale = max(abs(s) for d in ref.values() for s in d.values())
    assert 0 < worst <= 0.05 * scale, (worst, scale)


def test_evaluate_rejects_a_folder_that_is_not_a_checkpoint_in_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    proc = run(megarank_cmd(1, "evaluate", str(tmp_path), "--data", str(SAMPLE)), cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stdout[-3000:]
    errors = [ln for ln in proc.stdout.splitlines() if "error" in ln.lower()]
    message = f"megarank evaluate: error: {tmp_path} is not a megarank checkpoint (no model/metadata.json)"
    assert errors == [message], errors
    assert "Traceback" not in proc.stdout


def test_a_latest_marker_that_names_a_missing_step_is_a_named_error(tmp_path):
    from megarank.checkpoint import CheckpointError
    from megarank.checkpoint import resolve_checkpoint

    (tmp_path / "latest").write_text("step-7\n")
    with pytest.raises(CheckpointError, match=r"latest points at .*step-7, which is not a complete checkpoint"):
        resolve_checkpoint(str(tmp_path))


def test_a_runs_latest_file_passes_the_checkpoint_checks_a_stray_file_does_not(tmp_path):
    from megarank.checkpoint.run_folder import run_dir_of_pointer
    from megarank.cli.preflight import checkpoint_problem

    (tmp_path / "latest").write_text("step-7\n")
    (tmp_path / "notes.txt").write_text("x")
    assert checkpoint_problem(tmp_path / "latest") is None and run_dir_of_pointer(tmp_path / "latest") == tmp_path
    assert checkpoint_problem(tmp_path / "notes.txt") == "is a file, expected a folder"
    assert checkpoint_problem(tmp_path / "gone" / "latest") == "does not exist"
    assert run_dir_of_pointer(tmp_path / "notes.txt") == tmp_path / "notes.txt"


def test_rerank_top_k_20_names_recall_after_its_depth_and_outputs_get_the_usual_file_mode(evaluated):
    import os
    import stat

    work, outputs, _ = evaluated
    report = json.loads((work / "top20.json").read_text())
    assert report["top_k"] == 20
    beir = read_beir(str(SAMPLE), "test")
    scores = read_trec_run(work / "top20.trec")
    for system in ("megarank", "first_stage"):
        assert set(report[system]) == {"nDCG@10", "RR@10", "MRR@10", "R@10", "R@20"}, system
    assert report["megarank"]["R@20"] == pytest.approx(evaluate_run(beir.qrels, scores, ("R@20",))["R@20"], abs=1e-12)
    assert "R@20" in outputs["top20"] and "R@100" not in outputs["top20"]
    # the run file and the metrics file are outputs like an export: 0666 less the umask, not mkstemp's 0600
    umask = os.umask(0)
    os.umask(umask)
    for name in ("top20.trec", "top20.json", "one.trec", "one.json"):
        assert stat.S_IMODE((work / name).stat().st_mode) == 0o666 & ~umask, name
