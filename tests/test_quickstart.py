"""Tier 4: the README's main command end to end on the tiny default (init-tiny -> convert -> train ->
evaluate -> export -> verify), from a directory with no ../shared data."""
import json
import subprocess
import sys


def test_quickstart_runs_the_whole_pipeline(tmp_path):
    work = tmp_path / "qs"
    proc = subprocess.run(
        [sys.executable, "-m", "megarank", "quickstart", "--workdir", str(work), "--steps", "2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert (work / "train" / "latest").read_text().strip() == "step-2"
    metrics = json.loads((work / "test.metrics.json").read_text())
    for side in ("megarank", "first_stage"):
        assert {"nDCG@10", "MRR@10", "R@10", "R@100"} <= set(metrics[side])
    hf = json.loads((work / "reranker-hf" / "config.json").read_text())
    assert hf["architectures"] == ["LlamaBidirectionalForSequenceClassification"]
    assert (work / "reranker-hf" / "modeling_llama_bidirec.py").is_file()
    assert "quickstart finished" in out
