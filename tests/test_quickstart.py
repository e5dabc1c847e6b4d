"""Tier 4: the README's main command end to end on the tiny default (init-tiny -> convert -> train ->
evaluate -> export -> verify), from a directory with no ../shared data."""
import json
import os
import re
import shlex
import shutil
import stat
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
    # what the numbers mean, right after them: a plumbing check, the first stage is the baseline
    summary = out[out.index("quickstart finished"):]
    assert "nDCG@10" in summary and "(first stage " in summary
    assert "the model is a 2-layer Llama with random weights trained 2 steps" in summary
    assert "the first stage's numbers are the baseline" in summary
    assert f"saved step 2 to {work / 'train' / 'step-2'} (" in out
    umask = os.umask(0)
    os.umask(umask)
    for name in ("test.metrics.json", "test.run.trec", "reranker-hf/config.json"):
        assert stat.S_IMODE((work / name).stat().st_mode) == 0o666 & ~umask, name
    _public_door_scores_the_run_and_its_export_alike(work)
    # a second quickstart never resumes the first: a non-empty --workdir is refused, in one line, before any step
    again = subprocess.run([sys.executable, "-m", "megarank", "quickstart", "--workdir", str(work), "--steps", "2"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "$ " not in again.stdout, again.stdout + again.stderr
    assert again.stderr.splitlines() == [
        f"megarank quickstart: error: --workdir {work} is not empty (an earlier quickstart's files?), and a quickstart "
        "never resumes one; pass --overwrite to replace it, or choose another --workdir"]


def test_overwrite_puts_the_previous_workdir_back_when_the_new_quickstart_fails(tmp_path):
    """--overwrite moves the old work folder aside; a quickstart that fails (here: its training data is not UTF-8)
    leaves the old folder exactly as it was and no hidden copy beside it."""
    from megarank.data import sample_data_dir

    data = tmp_path / "data"
    shutil.copytree(sample_data_dir(), data)
    corpus = data / "corpus.jsonl"
    corpus.write_bytes(corpus.read_bytes().replace(b"Volcanoes", b"Volc\xe9noes", 1))
    work = tmp_path / "qs"
    (work / "train").mkdir(parents=True)
    (work / "train" / "latest").write_text("step-20\n")
    proc = subprocess.run([sys.executable, "-m", "megarank", "quickstart", "--workdir", str(work), "--overwrite",
                           "--data", str(data)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-4000:]
    assert "corpus.jsonl line 1" in proc.stderr and "Traceback" not in out
    assert f"the previous {work} was moved back" in proc.stdout
    assert sorted(p.relative_to(work).as_posix() for p in work.rglob("*")) == ["train", "train/latest"]
    assert (work / "train" / "latest").read_text() == "step-20\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "qs"], "the moved-aside copy is gone"


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


@pytest.mark.slow  # 4-8 min on 2 cores: the sample quickstart, then 20 Cranfield steps and 11,200 test pairs reranked
def test_readme_quickstart_on_cranfield_works_as_written(tmp_path):
    """The README's main command, then its `megarank quickstart --data ../shared/data/cranfield`, from the repo root
    as written, both in one work folder (moved out of the work tree): the second is refused (a quickstart never
    resumes another); with --overwrite it trains its own steps on Cranfield with the tiny config's defaults (never
    the sample-trained model), keeps a passage in (nearly) every sequence, and evaluates the real test split against
    its BM25 first stage."""
    commands = [c for c in _readme_commands("megarank quickstart --data") if "cranfield" in " ".join(c)]
    assert commands, "the README no longer shows the Cranfield quickstart command"
    argv = commands[0][1:]
    data = (REPO / argv[argv.index("--data") + 1]).resolve()
    if not data.is_dir():
        pytest.skip(f"{data} not found: the Cranfield quickstart needs the shared data folder ../shared/data")
    main = re.search(r"megarank (quickstart --workdir [^\s`]+)", (REPO / "README.md").read_text())
    assert main, "the README no longer shows the main command `megarank quickstart --workdir ...`"
    work = tmp_path / "qs"
    first = subprocess.run([sys.executable, "-m", "megarank", *shlex.split(main.group(1)), "--workdir", str(work)],
                           cwd=REPO, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    sample_step = (work / "train" / "latest").read_text().strip()

    refused = subprocess.run([sys.executable, "-m", "megarank", *argv, "--workdir", str(work)],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "$ " not in refused.stdout, refused.stdout + refused.stderr
    assert refused.stderr.startswith(f"megarank quickstart: error: --workdir {work} is not empty")
    assert len(refused.stderr.splitlines()) == 1

    proc = subprocess.run([sys.executable, "-m", "megarank", *argv, "--workdir", str(work), "--overwrite"],
                          cwd=REPO, capture_output=True, text=True, timeout=1500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out
    assert "resumed from" not in out, "the Cranfield quickstart resumed the sample-trained run"
    assert "before any passage token" not in out, "the tiny config cuts Cranfield pairs before their passage"
    # it trained all its steps, on Cranfield's training split
    from megarank.checkpoint import load_checkpoint_config
    from tests.training_harness import log_lines

    assert max(log_lines(out)) == 20 and (work / "train" / "latest").read_text().strip() == sample_step == "step-20"
    saved = load_checkpoint_config(work / "train" / "step-20")
    assert saved.data.train_path == str(data)
    assert re.search(r"\b\d+ training groups;", out) and "saved step 20 to " in out
    metrics = json.loads((work / "test.metrics.json").read_text())
    bm25 = json.loads((data / "candidates" / "bm25_eval.json").read_text())
    assert metrics["queries"] == 112
    assert metrics["first_stage"]["nDCG@10"] == pytest.approx(bm25["results"]["test"]["nDCG@10"], abs=1e-3), bm25
    assert 0.0 <= metrics["megarank"]["nDCG@10"] <= 1.0
    assert "These numbers check the plumbing, not a reranker" in out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".qs.old-")], "the previous workdir is deleted"
