"""megarank.config: strict YAML, dotted overrides, one validation that reports every problem, round trip."""
import dataclasses
import re
from pathlib import Path

import pytest

from megarank.config import (
    Config,
    ConfigError,
    ModelConfig,
    RopeScalingConfig,
    config_help,
    load_config,
    padded_vocab_size,
    save_config,
    transformer_engine_available,
    validate,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


def test_the_three_configs_ship():
    assert {p.name for p in CONFIGS} >= {"tiny.yaml", "llama3_2_1b.yaml", "llama3_1_8b.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(str(path))
    validate(cfg)  # transformer_impl auto resolves to local on CPU, so the big ones validate here too
    p = cfg.parallel
    world = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    validate(cfg, world_size=world)


def test_llama_configs_carry_the_real_dimensions():
    one_b = load_config(str(CONFIGS[0].parent / "llama3_2_1b.yaml")).model
    eight_b = load_config(str(CONFIGS[0].parent / "llama3_1_8b.yaml")).model
    assert (one_b.num_layers, one_b.hidden_size, one_b.ffn_hidden_size) == (16, 2048, 8192)
    assert (one_b.num_attention_heads, one_b.num_query_groups, one_b.kv_channels) == (32, 8, 64)
    assert (eight_b.num_layers, eight_b.hidden_size, eight_b.ffn_hidden_size) == (32, 4096, 14336)
    assert (eight_b.num_attention_heads, eight_b.num_query_groups, eight_b.kv_channels) == (32, 8, 128)
    for m, factor in ((one_b, 32.0), (eight_b, 8.0)):
        assert m.vocab_size == 128256 and m.rope_theta == 500000.0 and m.norm_eps == 1e-5
        assert m.rope_scaling == RopeScalingConfig(factor, 1.0, 4.0, 8192)
    assert one_b.tie_word_embeddings and not eight_b.tie_word_embeddings


def test_defaults_without_a_file():
    cfg = load_config()
    assert cfg == Config()
    validate(cfg)


# ----------------------------------------------------------------------------------------------- strict loading


def test_unknown_key_is_named_with_the_valid_ones(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hiden_size: 64\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(bad))
    msg = str(e.value)
    assert "bad.yaml" in msg and "model.hiden_size" in msg
    for valid in ("num_layers", "hidden_size", "rope_scaling", "pooling"):
        assert valid in msg
    with pytest.raises(ConfigError, match=r"unknown key trainer.*valid keys.*model, parallel, data, train"):
        load_config(TINY, ["trainer.lr=1.0"])
    with pytest.raises(ConfigError, match=r"model.rope_scaling.scale.*factor"):
        load_config(TINY, ["model.rope_scaling.scale=2"])


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("train.lr=fast", "train.lr", "number"),
        ("train.steps=1.5", "train.steps", "integer"),
        ("parallel.sequence_parallel=maybe", "parallel.sequence_parallel", "true/false"),
        ("model.pooling=max", "model.pooling", "avg"),
        ("model.rope_scaling=4", "model.rope_scaling", "mapping"),
    ],
)
def test_wrong_type_names_the_key(override, key, expected):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert key in str(e.value) and expected in str(e.value)


def test_invalid_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("model:\n  num_layers: 2\n  hidden_size: [64\ntrain:\n  lr: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(bad))
    msg = str(e.value)
    assert str(bad) in msg and "line " in msg and "invalid YAML" in msg
    line = int(msg.split("line ")[1].split(":")[0])
    assert 3 <= line <= 5  # where the parser noticed the unclosed list


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(listy))


# ----------------------------------------------------------------------------------------------- overrides


def test_dotted_overrides():
    cfg = load_config(
        TINY,
        [
            "train.lr=1e-5",  # YAML 1.1 reads this as a string; the float field still takes it
            "model.rope_scaling.factor=8",
            "parallel.tensor_model_parallel_size=2",
            "data.train_path=/data/x",
            "model.fp8=null",
            "model.pooling=last",
        ],
    )
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert cfg.model.rope_scaling.factor == 8.0 and cfg.model.rope_scaling.original_max_position_embeddings == 8192
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.data.train_path == "/data/x"
    assert cfg.model.fp8 is None and cfg.model.pooling == "last"
    # a nested section created by an override gets its other fields' defaults
    assert load_config(None, ["model.rope_scaling.factor=32"]).model.rope_scaling == RopeScalingConfig(factor=32.0)
    assert load_config(TINY, ["model.rope_scaling=null"]).model.rope_scaling is None


def test_malformed_override():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(TINY, ["train.lr"])
    with pytest.raises(ConfigError, match="train.lr.*not a section"):
        load_config(TINY, ["train.lr.x=1"])


# ----------------------------------------------------------------------------------------------- validation


def _problems(cfg, world_size=None) -> str:
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=world_size)
    return str(e.value)


def test_validate_reports_every_parallel_and_te_problem_at_once():
    cfg = load_config(
        TINY,
        [
            "parallel.tensor_model_parallel_size=3",  # 4 heads, 2 kv heads
            "parallel.pipeline_model_parallel_size=3",  # 2 layers
            "model.dtype=bf16",
        ],
    )
    if not transformer_engine_available():
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, fp8="hybrid", transformer_impl="transformer_engine"))
    msg = _problems(cfg, world_size=10)
    expected = [
        "model.num_attention_heads (4) must be divisible by parallel.tensor_model_parallel_size (3)",
        "model.num_query_groups (2) must be divisible by parallel.tensor_model_parallel_size (3)",
        "model.num_layers (2) must be divisible by parallel.pipeline_model_parallel_size (3)",
        "world size 10 is not divisible by tensor x pipeline parallel size",
    ]
    if not transformer_engine_available():
        expected += ["model.fp8 needs Transformer Engine and CUDA", "model.transformer_impl=transformer_engine needs Transformer Engine"]
    for line in expected:
        assert line in msg, f"missing {line!r} in:\n{msg}"
    assert msg.count("\n  - ") >= len(expected)


def test_validate_reports_sequence_parallel_and_batch_problems_at_once():
    cfg = load_config(TINY, ["parallel.sequence_parallel=true", "train.global_batch_size=6", "train.micro_batch_size=2"])
    msg = _problems(cfg, world_size=4)  # DP = 4
    assert "parallel.sequence_parallel needs parallel.tensor_model_parallel_size > 1" in msg
    assert "train.global_batch_size (6) must be divisible by train.micro_batch_size x data-parallel size (2 x 4)" in msg


def test_kv_heads_alone_not_divisible_by_tp():
    cfg = load_config(TINY, ["parallel.tensor_model_parallel_size=4"])  # 4 heads ok, 2 kv heads not
    msg = _problems(cfg)
    assert "model.num_query_groups (2) must be divisible by parallel.tensor_model_parallel_size (4)" in msg
    assert "num_attention_heads (4) must be divisible by parallel" not in msg


@pytest.mark.skipif(transformer_engine_available(), reason="Transformer Engine is present")
def test_fp8_on_cpu_is_a_clear_error():
    msg = _problems(load_config(TINY, ["model.fp8=hybrid", "model.dtype=bf16"]))
    assert "model.fp8 needs Transformer Engine and CUDA" in msg and "megarank[gpu]" in msg
    msg = _problems(load_config(TINY, ["model.transformer_impl=transformer_engine"]))
    assert "model.transformer_impl=transformer_engine needs Transformer Engine and CUDA" in msg


def test_good_parallel_layouts_validate():
    validate(load_config(TINY, ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]), world_size=4)
    validate(load_config(TINY, ["parallel.pipeline_model_parallel_size=2"]), world_size=2)


# ----------------------------------------------------------------------------------------------- round trip, help


def test_save_load_round_trip(tmp_path):
    cfg = load_config(TINY, ["train.lr=1e-5", "model.rope_scaling.factor=8", "data.template=q:{query} p:{passage}"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml")) == cfg
    no_rope = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, rope_scaling=None))
    save_config(no_rope, tmp_path / "no_rope.yaml")
    assert load_config(str(tmp_path / "no_rope.yaml")) == no_rope


def test_every_field_is_documented():
    text = config_help()
    for f in dataclasses.fields(ModelConfig):
        assert f.metadata.get("help"), f.name
        assert f"  {f.name}:" in text


def test_config_help_is_yaml_that_loads_as_the_defaults_and_lists_allowed_values(tmp_path):
    text = config_help()
    (tmp_path / "help.yaml").write_text(text)
    assert load_config(str(tmp_path / "help.yaml")) == load_config(None)  # YAML syntax: null, false, plain strings
    values = [line.split("  #")[0] for line in text.splitlines()]
    assert not [v for v in values if re.search(r": (None|True|False|'.*')$", v)], "Python reprs instead of YAML"
    assert "  teacher_run: null  #" in text
    assert "  packing: true  #" in text and "  loss: listwise  # [one of: listwise | pointwise | kl |" in text
    assert "  fp8: null  # [one of: hybrid | e4m3 | null]" in text
    assert "  format: beir  # [one of: jsonl | beir | nemo_corpus | parquet | hf_disk | triples]" in text


def test_padded_vocab_size_splits_evenly_over_tp():
    for tp in (1, 2, 4, 8):
        rows = padded_vocab_size(128256, 128, tp)
        assert rows >= 128256 and rows % tp == 0 and rows % 128 == 0
    assert padded_vocab_size(259, 64, 1) == 320


def test_list_keys_are_checked_item_by_item():
    cfg = load_config(TINY, ["model.recompute_modules=[mlp, layernorm]"])
    assert cfg.model.recompute_modules == ["mlp", "layernorm"]
    assert load_config(TINY).model.recompute_modules == ["core_attn"]  # megatron-core's default
    with pytest.raises(ConfigError, match=r"model.recompute_modules\[1\].*is not one of"):
        load_config(TINY, ["model.recompute_modules=[mlp, attention]"])
    with pytest.raises(ConfigError, match="model.recompute_modules.*expected a list"):
        load_config(TINY, ["model.recompute_modules=mlp"])


def test_gpu_layout_problems_are_listed_with_the_others():
    """Sequence-parallel and FP8 token divisibility and the delayed-scaling conflict come in the same list
    as the layout errors, each naming its key (before any process group exists)."""
    cfg = load_config(TINY, ["parallel.tensor_model_parallel_size=4", "parallel.sequence_parallel=true",
                             "data.pad_to_multiple_of=6", "model.transformer_impl=auto", "model.dtype=bf16",
                             "model.fp8=hybrid", "model.fp8_recipe=delayed", "model.fp8_first_last_bf16=true",
                             "model.num_query_groups=4"])
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=6, check_environment=False)
    msg = str(e.value)
    assert "data.pad_to_multiple_of (6) must be a multiple of parallel.tensor_model_parallel_size (4)" in msg
    assert "data.pad_to_multiple_of (6) must be a multiple of 16 x TP 4 under sequence parallel = 64" in msg
    assert "model.fp8_first_last_bf16 cannot be used with model.fp8_recipe=delayed" in msg
    assert "world size 6 is not divisible" in msg


def test_a_broken_transformer_engine_counts_as_absent(monkeypatch, tmp_path):
    """A TE whose package is found but whose PyTorch part fails to import (core-only wheel, missing .so) is
    treated like no TE: `auto` resolves to the local spec (megatron's HAVE_TE makes the same import)."""
    import sys

    import torch

    import megarank.config as config
    from megarank.model.spec import resolve_impl

    broken = tmp_path / "transformer_engine"
    broken.mkdir()
    (broken / "__init__.py").write_text("")
    (broken / "pytorch.py").write_text("raise OSError('libtransformer_engine.so: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("transformer_engine", "transformer_engine.pytorch"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config._te_pytorch_imports.cache_clear()
    try:
        assert not config.transformer_engine_available()
        assert resolve_impl("auto") == "local"
        (broken / "pytorch.py").write_text("")  # the same package, importable: counts
        for name in ("transformer_engine", "transformer_engine.pytorch"):
            sys.modules.pop(name, None)
        config._te_pytorch_imports.cache_clear()
        assert config.transformer_engine_available()
    finally:
        for name in ("transformer_engine", "transformer_engine.pytorch"):
            sys.modules.pop(name, None)
        config._te_pytorch_imports.cache_clear()
