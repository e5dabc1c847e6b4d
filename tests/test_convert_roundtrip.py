"""HF -> megarank -> HF conversions are bit-exact, and the streamed checkpoint is what megatron itself writes.

Tiny random Llamas with GQA (4 heads / 2 KV heads), Llama-3 rope scaling and a vocabulary that needs padding, in
each accepted input format, tied and untied, fp32 and bf16, single-file and sharded.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from checkpoint_tools.cli import main
from tests.helpers_hf import DIVISIBLE_BY, make_hf_llama, read_safetensors_folder

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def convert(*argv) -> None:
    assert main([str(a) for a in argv]) == 0


def import_export(tmp_path, src, *import_flags, export_flags=()):
    mg, out = tmp_path / "mg", tmp_path / "out"
    convert("hf-to-megatron", src, mg, "--make-vocab-size-divisible-by", DIVISIBLE_BY, "--quiet", *import_flags)
    convert("megatron-to-hf", mg, out, "--quiet", *export_flags)
    return mg, out


def assert_bit_exact(src, out, new_head: bool):
    a, b = read_safetensors_folder(src), read_safetensors_folder(out)
    assert "lm_head.weight" not in b
    expected = {k for k in a if k.startswith("model.")} | {"score.weight"}
    assert set(b) == expected
    for name, tensor in b.items():
        if name == "score.weight" and new_head:
            continue
        assert tensor.dtype == a[name].dtype, name
        assert torch.equal(tensor, a[name]), name


@pytest.mark.parametrize(
    "fmt,tied,shard",
    [("causal_lm", False, None), ("causal_lm", True, "60KB"), ("seq_cls", False, None), ("llama_bidirec", False, "60KB")],
)
def test_round_trip_is_bit_exact(tmp_path, fmt, tied, shard):
    src = make_hf_llama(tmp_path / "hf", fmt, tied=tied, shard=shard, seed=3)
    mg, out = import_export(tmp_path, src, export_flags=("--max-shard-size", "100KB"))
    assert_bit_exact(src, out, new_head=fmt == "causal_lm")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded export
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaBidirectionalForSequenceClassification"]
    assert cfg["model_type"] == "llama_bidirec" and cfg["num_labels"] == 1
    assert cfg["auto_map"]["AutoModelForSequenceClassification"] == "modeling_llama_bidirec.LlamaBidirectionalForSequenceClassification"
    assert (out / "modeling_llama_bidirec.py").is_file() and (out / "configuration_llama_bidirec.py").is_file()
    assert (out / "tokenizer.json").is_file() and (mg / "tokenizer" / "tokenizer.json").is_file()
    marker = json.loads((mg / "megarank_checkpoint.json").read_text())
    assert marker["kind"] == "converted" and marker["source_format"] == fmt


def test_new_score_head_is_seeded_normal(tmp_path):
    src = make_hf_llama(tmp_path / "hf", "causal_lm", seed=1)
    _, out = import_export(tmp_path, src, "--seed", "7")
    head = read_safetensors_folder(out)["score.weight"]
    g = torch.Generator().manual_seed(7)
    assert torch.equal(head, torch.randn(1, 64, generator=g) * 0.02)


def test_bf16_round_trip_keeps_dtype(tmp_path):
    src = make_hf_llama(tmp_path / "hf", "seq_cls", dtype=torch.bfloat16, seed=2)
    mg, out = import_export(tmp_path, src)
    assert_bit_exact(src, out, new_head=False)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from megarank.checkpoint import load_checkpoint_config

    assert load_checkpoint_config(mg).model.dtype == "bf16"


def test_bidirec_pooling_and_temperature_travel(tmp_path):
    src = make_hf_llama(tmp_path / "hf", "llama_bidirec", pooling="last", temperature=2.5)
    mg, out = import_export(tmp_path, src)
    from megarank.checkpoint import load_checkpoint_config

    m = load_checkpoint_config(mg).model
    assert (m.pooling, m.temperature) == ("last", 2.5)
    cfg = json.loads((out / "config.json").read_text())
    # the export folds the temperature into the head (vLLM never divides by it) and records what it folded
    assert (cfg["pooling"], cfg["temperature"], cfg["megarank_folded_temperature"]) == ("last", 1.0, 2.5)
    a, b = read_safetensors_folder(src), read_safetensors_folder(out)
    assert torch.equal(b["score.weight"], a["score.weight"] / 2.5)
    # re-import unfolds it: the training parameterization (head, temperature 2.5) comes back
    convert("hf-to-megatron", out, tmp_path / "mg3", "--quiet")
    assert load_checkpoint_config(tmp_path / "mg3").model.temperature == 2.5
    # flags override the source's
    convert("hf-to-megatron", src, tmp_path / "mg2", "--pooling", "cls", "--temperature", "0.5", "--quiet")
    m2 = load_checkpoint_config(tmp_path / "mg2").model
    assert (m2.pooling, m2.temperature) == ("cls", 0.5)


def test_config_yaml_carries_architecture(tmp_path):
    src = make_hf_llama(tmp_path / "hf", "causal_lm", tied=True)
    base = tmp_path / "base.yaml"  # agrees with the HF config where it sets architecture keys
    base.write_text("model: {num_layers: 2, hidden_size: 64, transformer_impl: local}\ntrain: {steps: 7}\n")
    mg, _ = import_export(tmp_path, src, "--config", base)
    from megarank.checkpoint import load_checkpoint_config

    cfg = load_checkpoint_config(mg)
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups) == (2, 64, 128, 4, 2)
    assert (m.vocab_size, m.rope_theta, m.norm_eps, m.tie_word_embeddings) == (300, 500000.0, 1e-5, True)
    assert m.rope_scaling.factor == 32.0 and m.rope_scaling.original_max_position_embeddings == 8192
    assert cfg.train.steps == 7 and m.transformer_impl == "local"  # the rest of --config is kept
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(mg / "model")).read_metadata()
    assert tuple(md.state_dict_metadata["embedding.word_embeddings.weight"].size) == (320, 64)


def test_export_reads_training_layout_and_run_dir(tmp_path):
    """A run directory (``latest`` -> step folder with optimizer/ and train_state/) exports its model only."""
    src = make_hf_llama(tmp_path / "hf", "seq_cls")
    mg = tmp_path / "run" / "step-5"
    convert("hf-to-megatron", src, mg, "--quiet")
    shutil.copytree(mg / "model", mg / "optimizer")  # stands in for optimizer state: must be ignored
    (mg / "train_state").mkdir()
    (tmp_path / "run" / "latest").write_text("step-5\n")
    convert("megatron-to-hf", tmp_path / "run", tmp_path / "out", "--quiet")
    assert_bit_exact(src, tmp_path / "out", new_head=False)


def test_export_dtype_cast(tmp_path):
    src = make_hf_llama(tmp_path / "hf", "seq_cls")
    _, out = import_export(tmp_path, src, export_flags=("--dtype", "bf16"))
    a, b = read_safetensors_folder(src), read_safetensors_folder(out)
    assert all(t.dtype == torch.bfloat16 for t in b.values())
    assert torch.equal(b["model.layers.1.self_attn.k_proj.weight"], a["model.layers.1.self_attn.k_proj.weight"].bfloat16())


def test_streamed_checkpoint_equals_megatron_save(tmp_path):
    """Load the streamed checkpoint into a megarank model, save it with megatron's own save: same metadata
    (keys, global shapes, dtypes, chunk layout) and the same tensors."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint import FileSystemReader

    from megarank.checkpoint import (
        load_checkpoint_config,
        load_model_weights,
        save_model_weights,
    )
    from megarank.model import build_model
    from megarank.parallel.init import init_distributed

    src = make_hf_llama(tmp_path / "hf", "causal_lm", seed=4)
    mg = tmp_path / "mg"
    convert("hf-to-megatron", src, mg, "--make-vocab-size-divisible-by", DIVISIBLE_BY, "--quiet")
    cfg = load_checkpoint_config(mg)
    init_distributed(1, 1)
    model = build_model(cfg.model, cfg.parallel)
    load_model_weights(model, mg)
    save_model_weights(model, tmp_path / "resaved")
    ours = FileSystemReader(str(mg / "model")).read_metadata().state_dict_metadata
    theirs = FileSystemReader(str(tmp_path / "resaved")).read_metadata().state_dict_metadata
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].size == theirs[key].size, key
        assert ours[key].properties.dtype == theirs[key].properties.dtype, key
        chunks = lambda md: sorted((tuple(c.offsets), tuple(c.sizes)) for c in md.chunks)
        assert chunks(ours[key]) == chunks(theirs[key]), key
    a = dist_checkpointing.load_plain_tensors(str(mg / "model"))
    b = dist_checkpointing.load_plain_tensors(str(tmp_path / "resaved"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((mg / "model" / "metadata.json").read_text()) == json.loads((tmp_path / "resaved" / "metadata.json").read_text())


def test_export_reimports_to_the_same_checkpoint(tmp_path):
    """HF -> megarank -> HF (llama_bidirec, 4.x-style rope keys) -> megarank: same config and tensors."""
    from megatron.core import dist_checkpointing

    from checkpoint_tools.megatron_reader import ensure_process_group
    from megarank.checkpoint import load_checkpoint_config

    src = make_hf_llama(tmp_path / "hf", "causal_lm", seed=12)
    mg, out = import_export(tmp_path, src)
    convert("hf-to-megatron", out, tmp_path / "mg2", "--make-vocab-size-divisible-by", DIVISIBLE_BY, "--quiet")
    assert load_checkpoint_config(mg).model == load_checkpoint_config(tmp_path / "mg2").model
    ensure_process_group()
    a = dist_checkpointing.load_plain_tensors(str(mg / "model"))
    b = dist_checkpointing.load_plain_tensors(str(tmp_path / "mg2" / "model"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_loads_as_automodel_backbone(tmp_path):
    import os

    from transformers import AutoModel

    src = make_hf_llama(tmp_path / "hf", "seq_cls", seed=13)
    _, out = import_export(tmp_path, src)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    backbone = AutoModel.from_pretrained(str(out), trust_remote_code=True)
    assert type(backbone).__name__ == "LlamaBidirectionalModel"
    ref = read_safetensors_folder(src)["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(backbone.layers[1].mlp.down_proj.weight.detach(), ref)
