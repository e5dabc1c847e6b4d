"""megarank/training/memory.py: the activation formula's pieces (CP, SP, PP, recompute, LoRA), numbers for known
shapes worked out by hand, the formula against the tensors a built model's autograd graph keeps, and the README's
8K-token dry run as written. (Parameter counts, DDP's gradient buffer and Adam's state are checked against built
models in tests/test_lora.py; peak RSS of CPU training steps in benchmarks/memory_bench.py.)"""
import shlex
from pathlib import Path

import pytest

from megarank.config import load_config
from megarank.training.memory import activations, estimate, layer_terms, micro_batch_tokens, report

ROOT = Path(__file__).resolve().parents[1]
L1B = str(ROOT / "configs" / "llama3_2_1b.yaml")
L8K = str(ROOT / "configs" / "llama3_2_1b_8k.yaml")
TINY = str(ROOT / "configs" / "tiny.yaml")
H_WIDE = {"attn_norm_in", "qkv_in", "mlp_norm_in", "fc1_in"}


def test_llama_3_2_1b_layer_by_hand():
    """h 2048, 32 heads, 8 groups of 64, ffn 8192, bf16 (2 bytes), Transformer Engine, TP 1, per token:
    norm inputs and linear inputs 4 x 2048 = 8192; qkv output (32 + 16) x 64 = 3072; q and k after RoPE
    (32 + 8) x 64 = 2560; attention output 2048; fc1 output 16384; fc2 input 8192 -> 40448 elements, 80896 bytes,
    + 32 heads x 4 bytes of log-sum-exp = 81024."""
    terms = layer_terms(load_config(L1B))
    assert sum(v for k, v in terms.items() if k != "softmax_lse") == 40448 * 2
    assert terms["softmax_lse"] == 128
    # configs/llama3_2_1b.yaml: 4 groups x 5 passages x 512 = 10240 tokens; 16 layers + the final norm's input
    # (2048 x 2 bytes) + the token ids (8 bytes), + one layer's backward working set
    a = activations(load_config(L1B), data_parallel=8)
    assert a.tokens == 10240 and a.per_layer == 10240 * 81024
    assert a.stored == 16 * 10240 * 81024 + 10240 * (4096 + 8) and a.working == a.per_layer


def test_the_8k_config_by_hand():
    """configs/llama3_2_1b_8k.yaml at 8 GPUs: 1 group x 5 x 8192 = 40960 tokens, 20480 per CP rank; weights
    1,235,816,448 x 2 bytes, fp32 gradients x 4, Adam + master 12 bytes over DP x CP = 8 ranks."""
    cfg = load_config(L8K)
    assert micro_batch_tokens(cfg) == 40960
    a = activations(cfg, data_parallel=4)
    assert a.tokens == 20480 and a.per_layer == 20480 * 81024 == 1_659_371_520
    assert a.stored == 16 * a.per_layer + 20480 * (4096 + 8)
    e = estimate(cfg, data_parallel=4, lora=False)
    n = 1_235_816_448
    assert (e.weights, e.gradients, e.optimizer) == (2 * n, 4 * n, 12 * n // 8)
    assert e.total == e.states + a.stored + a.working + 4 * 10**9
    # why CP 2 (the config's comment): CP 1 would leave ~10 GB of 80, CP 2 more than 38
    cp1 = estimate(load_config(L8K, ["parallel.context_parallel_size=1"]), 8, False).total
    assert 68e9 < cp1 < 72e9 and 80e9 - e.total > 38e9


def test_context_parallel_halves_the_activations():
    one = load_config(L8K, ["parallel.context_parallel_size=1"])
    two, four = load_config(L8K), load_config(L8K, ["parallel.context_parallel_size=4"])
    a1, a2, a4 = activations(one, 8), activations(two, 4), activations(four, 2)
    assert a1.stored == 2 * a2.stored == 4 * a4.stored and a1.working == 2 * a2.working
    # the state is sharded over DP x CP: the same 8 ranks at every CP
    assert estimate(one, 8, False).optimizer == estimate(two, 4, False).optimizer == estimate(four, 2, False).optimizer


def test_context_parallel_on_the_local_spec_keeps_the_gathered_keys_and_values():
    local = ["model.transformer_impl=local"]
    one = layer_terms(load_config(L8K, local + ["parallel.context_parallel_size=1"]))
    two = layer_terms(load_config(L8K, local))
    assert "kv_gathered" not in one and two["kv_gathered"] == 2 * 8 * 64 * 2  # (CP - 1) x 2 g e x 2 bytes


def test_full_recompute_keeps_only_each_chunks_input():
    cfg = load_config(L1B, ["model.recompute_granularity=full", "model.recompute_num_layers=1"])
    a, plain = activations(cfg, 8), activations(load_config(L1B), 8)
    t = 10240
    assert a.per_layer == plain.per_layer
    assert a.stored == 16 * t * 2048 * 2 + t * (4096 + 8)  # 16 layer inputs + final norm input + ids
    assert a.working == 2 * a.per_layer  # the layer rebuilt in backward and its gradients
    four = activations(load_config(L1B, ["model.recompute_granularity=full", "model.recompute_num_layers=4"]), 8)
    assert four.stored == 4 * t * 2048 * 2 + t * (4096 + 8) and four.working == 5 * a.per_layer


def test_selective_recompute_drops_what_it_recomputes():
    def terms(*o):
        return set(layer_terms(load_config(L1B, list(o))))

    sel = "model.recompute_granularity=selective"
    assert terms() - terms(sel, "model.recompute_modules=[core_attn]") == {"softmax_lse"}
    assert terms() - terms(sel, "model.recompute_modules=[mlp]") == {"fc1_in", "fc1_out", "fc2_in"}
    assert terms() == terms(sel, "model.recompute_modules=[layernorm]")  # TE fuses the norms: nothing to drop
    megatron = ["model.transformer_impl=local", "model.attention_backend=megatron"]
    probs = layer_terms(load_config(L1B, megatron))["probs"]
    assert probs == 32 * 512 * (4 + 2)  # fp32 softmax output + its bf16 copy, over the 512 keys of each query
    assert "probs" not in terms(*megatron, sel, "model.recompute_modules=[core_attn]")
    local = ["model.transformer_impl=local"]
    assert terms(*local) - terms(*local, sel, "model.recompute_modules=[layernorm]") == {"qkv_in", "fc1_in",
                                                                                         "norm_normed"}


def test_sequence_parallel_splits_the_h_wide_terms_over_tp():
    one = layer_terms(load_config(L1B))
    tp = layer_terms(load_config(L1B, ["parallel.tensor_model_parallel_size=2"]))
    sp = layer_terms(load_config(L1B, ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]))
    assert all(sp[k] == one[k] / 2 for k in one)
    assert all(tp[k] == (one[k] if k in H_WIDE else one[k] / 2) for k in one)


def test_pipeline_first_stage_holds_the_micro_batches_in_flight():
    cfg = load_config(L1B, ["parallel.pipeline_model_parallel_size=2"])
    a = activations(cfg, data_parallel=4)  # 128 / (4 x 4) = 8 micro-batches: min(PP, 8) = 2 in flight
    assert a.layers == 8 and a.in_flight == 2
    assert a.stored == 2 * (8 * a.per_layer + 8 * a.tokens)
    few = load_config(L1B, ["parallel.pipeline_model_parallel_size=4", "train.global_batch_size=32"])
    assert activations(few, data_parallel=2).in_flight == 4
    assert activations(few, data_parallel=8).in_flight == 1


def test_lora_changes_the_states_not_the_activations():
    cfg = load_config(L1B)
    full, lora = estimate(cfg, 8, lora=False), estimate(load_config(L1B, ["model.lora_rank=16"]), 8, lora=True)
    assert full.activations == lora.activations
    assert lora.weights > full.weights and lora.gradients < full.gradients / 100
    assert lora.optimizer < full.optimizer / 100


def test_token_budget_sets_the_micro_batch():
    assert micro_batch_tokens(load_config(L1B, ["train.micro_batch_tokens=16384"])) == 16384
    # a group over the budget forms a micro-batch alone
    assert micro_batch_tokens(load_config(L1B, ["train.micro_batch_tokens=1000"])) == 5 * 512


def test_report_is_one_table_with_the_fit():
    lines = report(load_config(L8K), 4, gpu_memory_gb=40)
    assert "micro-batch 40960 tokens (20480 per CP rank)" in lines[0]
    assert "fits 40 GB?" in lines[1]
    assert lines[2].split()[1:3] == ["full", "fine-tuning"] and "NO (this config)" in lines[2]
    assert lines[3].split()[1] == "LoRA" and lines[3].rstrip().endswith("yes")


# ----------------------------------------------------------------------------------------------- vs a built model


def _saved_bytes(output, exclude):
    """Distinct storages the autograd graph behind ``output`` keeps (as benchmarks/memory_bench.py counts)."""
    import torch

    seen, stack, visited = {}, [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        tensors = []
        for attr in dir(node):
            if attr.startswith("_saved_"):
                value = getattr(node, attr)
                tensors += value if isinstance(value, (tuple, list)) else [value]
        try:
            tensors += list(getattr(node, "saved_tensors", ()))
        except RuntimeError:
            pass
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in exclude:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack.extend(f for f, _ in node.next_functions)
    return sum(seen.values())


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_stored_activations_match_the_autograd_graph_of_a_built_model(one_rank, lora):
    """The local spec, fp32, 3 layers, GQA: the bytes the graph keeps for backward equal the formula's stored
    activations within 3% (the rest: RoPE's per-position tables, the mask, the pooled states)."""
    import torch

    from megarank.model import build_model

    b, s = 3, 48
    cfg = load_config(TINY, ["model.num_layers=3", "model.hidden_size=128", "model.ffn_hidden_size=352",
                             "model.num_attention_heads=4", "model.num_query_groups=2", "model.transformer_impl=local",
                             "model.dtype=fp32", "data.packing=false", "data.pad_to_multiple_of=8",
                             f"data.max_length={s}", f"data.n_passages={b}", "train.micro_batch_size=1"]
                     + (["model.lora_rank=8"] if lora else []))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.parallel).train()
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(1, cfg.model.vocab_size, (b, s))
    scores = model(ids, torch.ones(b, s, dtype=torch.bool))
    measured = _saved_bytes(scores, exclude)
    expected = activations(cfg, 1, lora).stored
    assert abs(measured - expected) <= 0.03 * expected, (measured, expected)


# ----------------------------------------------------------------------------------------------- README


def test_readme_8k_dry_run_runs_as_written(capsys, monkeypatch):
    """The README's 8K-token dry run validates the shipped config for one 8-GPU node (CP 2 x DP 4), and the README
    shows the table it prints."""
    from megarank.cli.launch import main

    readme = (ROOT / "README.md").read_text()
    commands = [line.strip() for line in readme.splitlines()
                if line.strip().startswith("megarank launch --dry-run") and "llama3_2_1b_8k.yaml" in line]
    assert len(commands) == 1, commands
    monkeypatch.chdir(ROOT)
    assert main(shlex.split(commands[0])[2:]) == 0
    lines = capsys.readouterr().out.splitlines()
    layout = next(line for line in lines if line.startswith("# layout"))
    assert layout.endswith("TP 1 x PP 1 x CP 2 x DP 4") and layout in readme
    start = next(i for i, line in enumerate(lines) if line.startswith("# memory per GPU"))
    table = lines[start:next(i for i, line in enumerate(lines) if line.startswith("# resolved config"))]
    assert len(table) == 5 and all(line in readme for line in table), "the README shows the dry run's estimate"
    assert table[2].rstrip().endswith("yes (this config)") and table[3].rstrip().endswith("yes")
