"""Tier 4: the README's main command end to end on the tiny default (init-tiny -> convert -> train ->
evaluate -> export -> verify), from a directory with no ../shared data."""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest


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
    _public_door_scores_the_run_and_its_export_alike(work)


PAIRS = [("what is megarank?", "megarank trains rerankers on megatron-core."), ("what is megarank?", "Paris is in France."),
         ("a longer question about late interaction and rerankers", "a passage " * 40)]


def _public_door_scores_the_run_and_its_export_alike(work: Path) -> None:
    """`megarank.Reranker` on the trained run folder and on its HF export (converted in memory) gives the same
    fp32 scores (<= 1e-5), and they equal the export under transformers fed its own chat template."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from megarank import Reranker

    with Reranker.from_checkpoint(work / "train", dtype="fp32") as run:
        ours = run.score(PAIRS)
    with Reranker.from_checkpoint(work / "reranker-hf", dtype="fp32") as export:
        from_export = export.score(PAIRS)
    path = work / "reranker-hf"
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True).float().eval()
    texts = [tok.apply_chat_template([{"role": "query", "content": q}, {"role": "document", "content": p}],
                                     tokenize=False) for q, p in PAIRS]
    batch = tok(texts, add_special_tokens=False, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        theirs = model(**batch).logits.float()[:, 0]
    assert ours.shape == (len(PAIRS),) and ours.dtype == torch.float32
    assert torch.allclose(ours, from_export, rtol=0, atol=1e-5), (ours, from_export)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-5), (ours, theirs)


REPO = Path(__file__).resolve().parents[1]


def _readme_commands(prefix: str) -> list[list[str]]:
    """Every `megarank quickstart ...` command the README shows inline (`...`), as argv lists."""
    text = (REPO / "README.md").read_text()
    return [shlex.split(m) for m in re.findall(r"`(" + re.escape(prefix) + r"[^`]*)`", text)]


@pytest.mark.slow  # 3-6 min on 2 cores: 20 steps, then 11,200 test pairs (256 tokens) reranked
def test_readme_quickstart_on_cranfield_works_as_written(tmp_path):
    """The README's `megarank quickstart --data ../shared/data/cranfield`, from the repo root as written (only
    the work folder is moved out of the work tree): it trains with the tiny config's defaults, keeps a passage
    in (nearly) every sequence, and evaluates the real test split against its BM25 first stage."""
    commands = [c for c in _readme_commands("megarank quickstart --data") if "cranfield" in " ".join(c)]
    assert commands, "the README no longer shows the Cranfield quickstart command"
    argv = commands[0][1:]
    data = (REPO / argv[argv.index("--data") + 1]).resolve()
    if not data.is_dir():
        pytest.skip(f"{data} not found")
    work = tmp_path / "qs"
    proc = subprocess.run([sys.executable, "-m", "megarank", *argv, "--workdir", str(work)],
                          cwd=REPO, capture_output=True, text=True, timeout=1500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out
    assert "before any passage token" not in out, "the tiny config cuts Cranfield pairs before their passage"
    metrics = json.loads((work / "test.metrics.json").read_text())
    bm25 = json.loads((data / "candidates" / "bm25_eval.json").read_text())
    assert metrics["queries"] == 112
    assert metrics["first_stage"]["nDCG@10"] == pytest.approx(bm25["results"]["test"]["nDCG@10"], abs=1e-3), bm25
    assert 0.0 <= metrics["megarank"]["nDCG@10"] <= 1.0
