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
    assert set(sub.choices) == {"hf-to-megatron", "megatron-to-hf", "lora-to-peft", "verify"}
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


def test_verify_clears_ngcs_tf32_override_before_torch_reads_it(tmp_path):
    """NGC images export TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1; torch latches it at import and it beats allow_tf32=False
    (checkpoint_tools/tf32.py), so fp32 verify would compare TF32 scores on a GPU. `verify` clears it first; other
    commands leave the user's setting alone. Observable on CPU: torch's allow_tf32 getter reports the override."""
    import os
    import subprocess
    import sys

    # The CLI module must not import torch itself, or the override would be latched before main() runs.
    script = ("import sys\nfrom checkpoint_tools.cli import main\nassert 'torch' not in sys.modules\n"
              "rc = main(sys.argv[1:])\nimport torch\nprint('rc', rc, 'tf32', torch.backends.cuda.matmul.allow_tf32)\n")
    env = {**os.environ, "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "1"}
    missing = [str(tmp_path / "no-hf"), str(tmp_path / "no-mg")]

    def run_cli(*args):
        return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path)

    verify = run_cli("verify", *missing)
    assert "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 ignored" in verify.stdout, verify.stdout + verify.stderr
    assert "rc 2 tf32 False" in verify.stdout, verify.stdout + verify.stderr  # a missing folder: error, exit 2
    other = run_cli("megatron-to-hf", *missing)
    assert "rc 2 tf32 True" in other.stdout, other.stdout + other.stderr
