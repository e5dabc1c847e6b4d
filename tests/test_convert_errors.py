"""Every bad input gives one clear error (exit status 2, message naming the problem) and leaves no DST behind."""
from __future__ import annotations

import json
import struct

import pytest
import torch
import yaml

from checkpoint_tools.cli import main
from tests.helpers_hf import edit_config, make_hf_llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def fails(capsys, *argv) -> str:
    """Run the CLI; it must fail with status 2 and no output folder (nor temp folder) left behind."""
    argv = [str(a) for a in argv]
    dst = argv[2]
    existed = __import__("os").path.exists(dst)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1, err
    from pathlib import Path

    if not existed:
        assert not Path(dst).exists(), dst
    assert not list(Path(dst).parent.glob(f".{Path(dst).name}.tmp-*")), "temp folder left behind"
    return err


@pytest.fixture()
def hf(tmp_path):
    return make_hf_llama(tmp_path / "hf", "causal_lm", seed=1)


def _rewrite(folder, drop=(), add=None, replace=None):
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    sd = load_file(str(path))
    for k in drop:
        del sd[k]
    sd.update(add or {})
    sd.update(replace or {})
    save_file(sd, str(path), metadata={"format": "pt"})


def test_non_llama_architecture(tmp_path, hf, capsys):
    edit_config(hf, architectures=["MistralForCausalLM"], model_type="mistral")
    err = fails(capsys, "hf-to-megatron", hf, tmp_path / "dst")
    assert "architecture MistralForCausalLM (model_type mistral) is not a supported Llama model" in err


def test_unsupported_llama_variants(tmp_path, hf, capsys):
    edit_config(hf, rope_scaling={"rope_type": "yarn", "factor": 4.0}, rope_parameters=None)
    assert "rope scaling type 'yarn' is not supported" in fails(capsys, "hf-to-megatron", hf, tmp_path / "dst")
    edit_config(hf, rope_scaling=None, attention_bias=True)
    assert "attention_bias=true is not supported" in fails(capsys, "hf-to-megatron", hf, tmp_path / "dst")


def test_missing_tensor(tmp_path, hf, capsys):
    _rewrite(hf, drop=["model.layers.1.mlp.up_proj.weight"])
    assert "tensor model.layers.1.mlp.up_proj.weight is missing" in fails(capsys, "hf-to-megatron", hf, tmp_path / "dst")


def test_unexpected_tensor(tmp_path, hf, capsys):
    _rewrite(hf, add={"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)})
    err = fails(capsys, "hf-to-megatron", hf, tmp_path / "dst")
    assert "unexpected tensor model.layers.0.self_attn.q_proj.bias (shape [64])" in err


def test_shape_mismatch_names_both_shapes(tmp_path, hf, capsys):
    _rewrite(hf, replace={"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)})
    err = fails(capsys, "hf-to-megatron", hf, tmp_path / "dst")
    assert "tensor model.layers.0.self_attn.k_proj.weight has shape [16, 64] but config.json implies [32, 64]" in err


def test_truncated_safetensors(tmp_path, hf, capsys):
    path = hf / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    err = fails(capsys, "hf-to-megatron", hf, tmp_path / "dst")
    assert "model.safetensors is truncated" in err


def test_corrupt_safetensors_header(tmp_path, hf, capsys):
    path = hf / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8 : 8 + 20] = b"\x00garbage-not-json!!!"
    path.write_bytes(bytes(data))
    assert "is corrupt: its safetensors header is not valid JSON" in fails(capsys, "hf-to-megatron", hf, tmp_path / "dst")
    path.write_bytes(struct.pack("<Q", 10**12) + bytes(data[8:]))
    assert "is truncated or corrupt: its header claims" in fails(capsys, "hf-to-megatron", hf, tmp_path / "dst")


def test_existing_destination_needs_overwrite(tmp_path, hf, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    assert "already exists; pass --overwrite to replace it" in fails(capsys, "hf-to-megatron", hf, dst)
    assert (dst / "keep.txt").read_text() == "old"  # untouched
    assert main(["hf-to-megatron", str(hf), str(dst), "--overwrite", "--quiet"]) == 0
    assert not (dst / "keep.txt").exists() and (dst / "model" / "metadata.json").is_file()


def test_destination_must_not_replace_source(hf, capsys):
    assert main(["hf-to-megatron", str(hf), str(hf), "--overwrite"]) == 2
    assert "would replace the source" in capsys.readouterr().err
    assert (hf / "config.json").is_file()


def test_pickle_weights_refused_unless_allowed(tmp_path, hf, capsys):
    from safetensors.torch import load_file

    sd = load_file(str(hf / "model.safetensors"))
    (hf / "model.safetensors").unlink()
    torch.save(sd, hf / "pytorch_model.bin")
    err = fails(capsys, "hf-to-megatron", hf, tmp_path / "dst")
    assert "holds only PyTorch pickle weights (pytorch_model.bin)" in err and "--allow-pickle" in err
    assert main(["hf-to-megatron", str(hf), str(tmp_path / "dst"), "--allow-pickle", "--quiet"]) == 0


def test_requested_config_contradicting_hf(tmp_path, hf, capsys):
    base = tmp_path / "base.yaml"
    base.write_text("model: {hidden_size: 128}\n")
    err = fails(capsys, "hf-to-megatron", hf, tmp_path / "dst", "--config", base)
    assert "has model.hidden_size = 128 but" in err and "contradicts the checkpoint" in err


@pytest.fixture()
def megatron(tmp_path, hf):
    mg = tmp_path / "mg"
    assert main(["hf-to-megatron", str(hf), str(mg), "--quiet"]) == 0
    return mg


def test_saved_config_contradicting_weights(tmp_path, megatron, capsys):
    cfg = yaml.safe_load((megatron / "config.yaml").read_text())
    cfg["model"]["ffn_hidden_size"] = 96
    (megatron / "config.yaml").write_text(yaml.safe_dump(cfg))
    __import__("megarank.checkpoint").checkpoint.write_manifest(megatron)  # re-checksum the edit (else: "damaged")
    err = fails(capsys, "megatron-to-hf", megatron, tmp_path / "out")
    assert "decoder.layers.mlp.linear_fc1.weight has shape [2, 256, 64] but config.yaml's model section implies [2, 192, 64]" in err


def test_requested_config_contradicting_checkpoint(tmp_path, megatron, capsys):
    want = tmp_path / "want.yaml"
    want.write_text("model: {num_layers: 4, pooling: avg}\n")
    err = fails(capsys, "megatron-to-hf", megatron, tmp_path / "out", "--config", want)
    assert "want.yaml has model.num_layers = 4 but" in err and "config.yaml has 2" in err
    want.write_text("model: {pooling: last}\n")
    assert "sets model.pooling = last but" in fails(capsys, "megatron-to-hf", megatron, tmp_path / "out", "--config", want)


def test_not_a_megarank_checkpoint(tmp_path, hf, capsys):
    assert "is not a megarank checkpoint (no model/metadata.json)" in fails(capsys, "megatron-to-hf", hf, tmp_path / "out")


def test_megatron_missing_and_unexpected_tensors(tmp_path, megatron, capsys):
    """Write checkpoints with one tensor removed / one extra, with the same streaming writer."""
    from megatron.core import dist_checkpointing

    from checkpoint_tools.megatron_reader import ensure_process_group
    from checkpoint_tools.megatron_writer import whole_chunk, write_torch_dist

    ensure_process_group()
    tensors = dist_checkpointing.load_plain_tensors(str(megatron / "model"))
    for change, expected in (("drop", "tensor score.weight is missing"), ("add", "unexpected tensor decoder.extra.weight (shape [3])")):
        d = dict(tensors)
        if change == "drop":
            d.pop("score.weight")
        else:
            d["decoder.extra.weight"] = torch.zeros(3)
        bad = tmp_path / f"bad_{change}"
        bad.mkdir()
        for f in ("config.yaml", "megarank_checkpoint.json"):
            (bad / f).write_bytes((megatron / f).read_bytes())
        write_torch_dist(bad / "model", [whole_chunk(k, tuple(v.shape), v.dtype, lambda v=v: v) for k, v in d.items()])
        assert expected in fails(capsys, "megatron-to-hf", bad, tmp_path / f"out_{change}")


def test_bad_index_file(tmp_path, capsys):
    hf = make_hf_llama(tmp_path / "hf", "causal_lm", shard="60KB")
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (hf / victim).unlink()
    assert f"names shard {victim}, which does not exist" in fails(capsys, "hf-to-megatron", hf, tmp_path / "dst")
