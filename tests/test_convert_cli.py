"""The converter CLI: help texts, progress/summary output, ``python -m checkpoint_tools``, and ``verify``."""
from __future__ import annotations

import subprocess
import sys

import pytest

from checkpoint_tools.cli import build_parser, main
from tests.helpers_hf import make_hf_llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_every_option_is_explained():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == {"hf-to-megatron", "megatron-to-hf", "verify"}
    for name, p in sub.choices.items():
        assert p.description, name
        for action in p._actions:
            assert action.help and len(action.help) > 10, (name, action.dest)
    tp_help = next(a.help for a in sub.choices["hf-to-megatron"]._actions if a.dest == "tp")
    assert "any TP" in tp_help


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "checkpoint_tools", "megatron-to-hf", "--help"], capture_output=True, text=True, check=True)
    assert "trust_remote_code=True" in out.stdout and "--max-shard-size" in out.stdout


def test_progress_and_summary(tmp_path, capsys):
    src = make_hf_llama(tmp_path / "hf", "seq_cls")
    assert main(["hf-to-megatron", str(src), str(tmp_path / "mg")]) == 0
    out, err = capsys.readouterr()
    assert "[hf-to-megatron] 17/17 tensors" in err  # progress: tensor count and bytes
    assert out.startswith("hf-to-megatron: 17 tensors,") and "peak RSS" in out and " s, " in out
    assert main(["megatron-to-hf", str(tmp_path / "mg"), str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert "[megatron-to-hf] 21/21 tensors" in err and out.startswith("megatron-to-hf: 21 tensors,")


def test_verify(tmp_path, capsys):
    src = make_hf_llama(tmp_path / "hf", "causal_lm", seed=8)
    mg = tmp_path / "mg"
    assert main(["hf-to-megatron", str(src), str(mg), "--quiet"]) == 0
    assert main(["megatron-to-hf", str(mg), str(tmp_path / "out"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["verify", str(src), str(mg), "--tol", "1e-5"]) == 0  # base LM: the new head on both sides
    out = capsys.readouterr().out
    assert "max abs diff" in out and "OK" in out and "new head" in out
    assert main(["verify", str(tmp_path / "out"), str(mg), "--tol", "1e-5"]) == 0  # the export
    other = make_hf_llama(tmp_path / "other", "causal_lm", seed=9)  # same shapes, other weights
    capsys.readouterr()
    assert main(["verify", str(other), str(mg)]) == 1
    assert "FAILED" in capsys.readouterr().out
    wide = make_hf_llama(tmp_path / "wide", "causal_lm", intermediate_size=96)
    assert main(["verify", str(wide), str(mg)]) == 2
    assert "model.ffn_hidden_size = 128 but" in capsys.readouterr().err


def test_converters_do_not_import_training():
    code = (
        "import sys, checkpoint_tools.cli, checkpoint_tools.import_hf, checkpoint_tools.export_hf, checkpoint_tools.verify;"
        "bad = [m for m in sys.modules if m.startswith('megarank.training')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
