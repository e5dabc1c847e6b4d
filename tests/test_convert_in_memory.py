"""``hf_to_megatron_in_memory`` returns exactly what ``hf-to-megatron`` writes: the same config.yaml Config and,
bit for bit, the same global tensors under the same keys in ``model/``, without writing anything.

Tiny random Llamas with GQA (4 heads / 2 KV heads) and a vocabulary that needs padding (tests/helpers_hf.py), in
each accepted input format, including a megarank export whose folded temperature is multiplied back.
"""
from __future__ import annotations

import pytest
import torch
import yaml

from checkpoint_tools.cli import main
from checkpoint_tools.errors import ConversionError
from checkpoint_tools.import_hf import hf_to_megatron_in_memory
from tests.helpers_hf import make_hf_llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def convert(*argv) -> None:
    assert main([str(a) for a in argv]) == 0


def written_tensors(ckpt) -> dict:
    from megatron.core import dist_checkpointing

    from checkpoint_tools.megatron_reader import ensure_process_group

    ensure_process_group()
    return dist_checkpointing.load_plain_tensors(str(ckpt / "model"))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def files_under(folder) -> set:
    return {(p.relative_to(folder), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def assert_same_as_cli(src, ckpt, overrides=()):
    """The in-memory result equals the CLI's checkpoint folder ``ckpt``; nothing is written."""
    from megarank.checkpoint import load_checkpoint_config
    from megarank.config import config_to_dict

    before = files_under(src.parent)
    cfg, tensors, tokenizer = hf_to_megatron_in_memory(src, overrides)
    assert files_under(src.parent) == before  # wrote nothing
    assert cfg == load_checkpoint_config(ckpt)
    saved = yaml.safe_load((ckpt / "config.yaml").read_text())
    assert yaml.safe_load(yaml.safe_dump(config_to_dict(cfg), sort_keys=False)) == saved
    on_disk = written_tensors(ckpt)
    assert tensors.keys() == on_disk.keys()
    for key, tensor in on_disk.items():
        ours = tensors[key]
        assert ours.dtype == tensor.dtype and ours.shape == tensor.shape, key
        assert torch.equal(bits(ours), bits(tensor)), key
    assert tokenizer == src
    return cfg, tensors


@pytest.mark.parametrize("fmt,dtype", [("causal_lm", torch.float32), ("seq_cls", torch.bfloat16), ("llama_bidirec", torch.float32)])
def test_in_memory_equals_hf_to_megatron(tmp_path, fmt, dtype):
    src = make_hf_llama(tmp_path / "in" / "hf", fmt, seed=21, dtype=dtype, shard="60KB", temperature=2.0)
    ckpt = tmp_path / "mg"
    convert("hf-to-megatron", src, ckpt, "--quiet")
    cfg, tensors = assert_same_as_cli(src, ckpt)
    assert tensors["decoder.layers.self_attention.linear_qkv.weight"].shape == (2, (4 + 2 * 2) * 16, 64)
    assert tensors["embedding.word_embeddings.weight"].shape == (384, 64)  # vocab 300 padded to 128's multiple
    assert all(t.dtype == dtype for t in tensors.values())


def test_in_memory_unfolds_an_exports_temperature(tmp_path):
    """A megarank export (head folded by T = 3) comes back with temperature 3 and the head multiplied back."""
    src = make_hf_llama(tmp_path / "hf", "llama_bidirec", seed=22, pooling="last", temperature=3.0)
    convert("hf-to-megatron", src, tmp_path / "mg", "--quiet")
    export = tmp_path / "in" / "export"
    convert("megatron-to-hf", tmp_path / "mg", export, "--quiet")
    convert("hf-to-megatron", export, tmp_path / "mg2", "--quiet")
    cfg, tensors = assert_same_as_cli(export, tmp_path / "mg2")
    assert (cfg.model.pooling, cfg.model.temperature) == ("last", 3.0)
    original = written_tensors(tmp_path / "mg")["score.weight"]
    assert torch.allclose(tensors["score.weight"], original, rtol=1e-6, atol=0)


def test_an_exports_trained_input_comes_back_unless_overridden(tmp_path):
    """The template and max_length a megarank export was trained with (its tokenizer_config.json) become the imported
    data section, on disk and in memory alike, so a scorer of the import feeds what the export's consumers feed;
    --config / overrides still win."""
    src = make_hf_llama(tmp_path / "hf", "llama_bidirec", seed=24)
    base = tmp_path / "base.yaml"
    base.write_text('data: {max_length: 96, max_query_length: 30, template: "Q: {query} D: {passage}"}\n')
    convert("hf-to-megatron", src, tmp_path / "mg", "--config", base, "--quiet")
    export = tmp_path / "in" / "export"
    convert("megatron-to-hf", tmp_path / "mg", export, "--quiet")
    convert("hf-to-megatron", export, tmp_path / "mg2", "--quiet")
    cfg, _ = assert_same_as_cli(export, tmp_path / "mg2")
    assert (cfg.data.template, cfg.data.max_length, cfg.data.max_query_length) == ("Q: {query} D: {passage}", 96, 30)
    cfg, _ = hf_to_megatron_in_memory(export, ["data.max_length=48"])[:2]  # the budget of 96 is not carried to 48
    assert (cfg.data.template, cfg.data.max_length, cfg.data.max_query_length) == ("Q: {query} D: {passage}", 48, None)
    plain, _ = hf_to_megatron_in_memory(src)[:2]  # not a megarank export: its tokenizer's limit is not a choice
    assert plain.data.max_length == 512


def test_overrides_apply_like_config_and_flags(tmp_path):
    src = make_hf_llama(tmp_path / "in" / "hf", "llama_bidirec", seed=23, pooling="avg")
    base = tmp_path / "base.yaml"
    base.write_text("data: {max_length: 64}\nmodel: {make_vocab_size_divisible_by: 64}\n")
    convert("hf-to-megatron", src, tmp_path / "mg", "--config", base, "--pooling", "cls", "--quiet")
    overrides = ["data.max_length=64", "model.make_vocab_size_divisible_by=64", "model.pooling=cls"]
    cfg, tensors = assert_same_as_cli(src, tmp_path / "mg", overrides)
    assert (cfg.data.max_length, cfg.model.pooling) == (64, "cls")
    assert tensors["embedding.word_embeddings.weight"].shape == (320, 64)


def test_overrides_contradicting_the_source_are_refused(tmp_path):
    src = make_hf_llama(tmp_path / "hf", "causal_lm", seed=24, tokenizer=False)
    with pytest.raises(ConversionError, match="has model.hidden_size = 128 but .*config.json has 64"):
        hf_to_megatron_in_memory(src, ["model.hidden_size=128"])
    with pytest.raises(ConversionError, match="unknown key train.nope"):
        hf_to_megatron_in_memory(src, ["train.nope=1"])
    cfg, tensors, tokenizer = hf_to_megatron_in_memory(src)
    assert tokenizer is None and "score.weight" in tensors and cfg.model.num_labels == 1
