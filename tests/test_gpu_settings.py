"""GPU settings, checked on CPU: what megatron-core / Transformer Engine enforce is reported by validate(),
the GPU speed settings reach megatron where they can run and are off on CPU, and each code path a CPU can
execute (config building, recompute, overlapped DDP with gloo, skipped init) is executed.

The GPU TransformerConfig of a shipped config is built here with ``cuda=True``. Two build-time checks
look for Transformer Engine itself and are answered as TE would answer them on the GPU machine (NGC):
``fused_apply_rotary_pos_emb`` exists (TE >= 1.4, transformer_config.py:1549-1552) and the TE version is
recent (``is_te_min_version``, used only by the fp8 + layernorm-recompute check).
"""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from megarank.config import ConfigError, load_config, validate

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(str(p) for p in (ROOT / "configs").glob("*.yaml"))
TINY = str(ROOT / "configs" / "tiny.yaml")
L8B = str(ROOT / "configs" / "llama3_1_8b.yaml")
L1B = str(ROOT / "configs" / "llama3_2_1b.yaml")
SPEED_KEYS = {
    "model": ["gradient_accumulation_fusion", "bias_swiglu_fusion", "apply_rope_fusion", "recompute_granularity",
              "recompute_modules"],
    "parallel": ["overlap_grad_reduce", "overlap_param_gather"],
}


@pytest.fixture
def te_build_checks(monkeypatch):
    """Answer megatron's two TE look-ups at TransformerConfig build time as TE on the GPU machine does."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer import transformer_config as tc

    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", lambda *a, **k: None)
    monkeypatch.setattr(tc, "is_te_min_version", lambda *a, **k: True)


@pytest.fixture
def one_rank():
    from megarank.parallel.init import destroy_distributed, init_distributed

    init_distributed(tp=1, pp=1)
    yield
    destroy_distributed()


def gpu_config(cfg, impl="transformer_engine", ddp_training=True, init_weights=True):
    from megarank.model.transformer_config import make_transformer_config

    return make_transformer_config(cfg.model, cfg.parallel, impl, cuda=True, ddp_training=ddp_training,
                                   init_weights=init_weights)


def megatron_rejects(cfg) -> str | None:
    """The error megatron-core raises building this config's GPU TransformerConfig (TE spec), if any."""
    try:
        gpu_config(cfg)
    except (ValueError, AssertionError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def validate_errors(cfg) -> str | None:
    try:
        validate(cfg, world_size=None, check_environment=False)
    except ConfigError as e:
        return str(e)
    return None


# ----------------------------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: Path(p).stem)
def test_shipped_configs_build_their_gpu_transformer_config(path, te_build_checks):
    cfg = load_config(path)
    validate(cfg, world_size=None, check_environment=False)
    te = gpu_config(cfg)
    # what Megatron-LM turns on for Llama on Hopper, where TE provides it
    assert te.gradient_accumulation_fusion == cfg.model.gradient_accumulation_fusion
    assert te.bias_activation_fusion == cfg.model.bias_swiglu_fusion and not te.use_te_activation_func
    assert te.apply_rope_fusion == cfg.model.apply_rope_fusion
    assert te.masked_softmax_fusion and te.bias_dropout_fusion and te.normalization == "RMSNorm"
    assert te.recompute_granularity == cfg.model.recompute_granularity
    assert te.recompute_modules == cfg.model.recompute_modules
    # the local spec on a GPU keeps its own SwiGLU and has no TE kernels to fuse with
    local = gpu_config(cfg, impl="local")
    assert local.use_te_activation_func and not local.bias_activation_fusion
    assert not (local.apply_rope_fusion or local.gradient_accumulation_fusion or local.masked_softmax_fusion)


@pytest.mark.parametrize("path", [L1B, L8B], ids=lambda p: Path(p).stem)
def test_gpu_configs_name_every_speed_setting(path):
    """Each GPU speed setting is written in the launch-ready configs (with its comment), not left implicit."""
    import yaml

    raw = yaml.safe_load(Path(path).read_text())
    text = Path(path).read_text()
    for section, keys in SPEED_KEYS.items():
        for key in keys:
            assert key in raw[section], f"{section}.{key} missing in {path}"
            line = next(l for l in text.splitlines() if l.strip().startswith(f"{key}:"))
            before = text.splitlines()[text.splitlines().index(line) - 1]
            assert "#" in line or before.strip().startswith("#"), f"{key} has no comment in {path}"
    assert "big activation saving" not in text  # TE's flash/fused attention keeps no score matrix to save


def test_every_gpu_setting_is_off_on_cpu():
    from megarank.model.transformer_config import make_transformer_config

    for path in SHIPPED:
        cfg = load_config(path)
        for impl in ("transformer_engine", "local"):
            c = make_transformer_config(cfg.model, cfg.parallel, impl, cuda=False, ddp_training=True)
            assert not (c.gradient_accumulation_fusion or c.bias_activation_fusion or c.apply_rope_fusion
                        or c.masked_softmax_fusion or c.bias_dropout_fusion), (path, impl)
            assert c.use_cpu_initialization and c.perform_initialization


def test_gradient_accumulation_fusion_needs_ddp_training_te_and_cuda(te_build_checks):
    cfg = load_config(L8B)
    assert gpu_config(cfg, ddp_training=True).gradient_accumulation_fusion
    # a model run backward without DDP has no main_grad for TE to accumulate into
    assert not gpu_config(cfg, ddp_training=False).gradient_accumulation_fusion
    off = load_config(L8B, ["model.gradient_accumulation_fusion=false", "model.bias_swiglu_fusion=false",
                            "model.apply_rope_fusion=false"])
    c = gpu_config(off)
    assert not (c.gradient_accumulation_fusion or c.bias_activation_fusion or c.apply_rope_fusion)


# ----------------------------------------------------------------------------------------------- validate


def _variants():
    fp8 = [["model.fp8=null"]] + [
        ["model.fp8=hybrid", "model.dtype=bf16", f"model.fp8_recipe={r}", f"model.fp8_first_last_bf16={f}"]
        for r, f in itertools.product(["delayed", "tensorwise"], ["true", "false"])
    ]
    recompute = [
        ["model.recompute_granularity=null"],
        ["model.recompute_granularity=selective", "model.recompute_modules=[core_attn]"],
        ["model.recompute_granularity=selective", "model.recompute_modules=[layernorm,mlp]"],
        ["model.recompute_granularity=full", "model.recompute_num_layers=1"],
    ]
    for path, f, r in itertools.product(SHIPPED, fp8, recompute):
        yield path, f + r


def test_validate_reports_everything_megatron_rejects_in_the_shipped_configs(te_build_checks):
    """For each shipped config with FP8 / recompute variations: whenever megatron-core's TransformerConfig
    __post_init__ raises for the GPU settings, validate() has already reported it, naming a key."""
    rejected = 0
    for path, overrides in _variants():
        cfg = load_config(path, overrides)
        megatron = megatron_rejects(cfg)
        ours = validate_errors(cfg)
        if megatron is not None:
            rejected += 1
            assert ours is not None, f"{Path(path).stem} {overrides}: megatron raises {megatron!r}, validate passes"
            assert "model." in ours
    assert rejected >= len(SHIPPED) * 2  # delayed + first/last bf16 and delayed + layernorm recompute at least


def test_delayed_scaling_with_first_last_bf16_is_named_before_megatron_raises(te_build_checks):
    cfg = load_config(L8B, ["model.fp8=hybrid", "model.fp8_recipe=delayed", "model.fp8_first_last_bf16=true"])
    with pytest.raises(ValueError, match="Delayed scaling does not support first / last layer"):
        gpu_config(cfg)  # megatron-core 0.16.1 transformer_config.py:990-991
    with pytest.raises(ConfigError, match="model.fp8_first_last_bf16"):
        validate(cfg, check_environment=False)
    validate(load_config(L8B, ["model.fp8=hybrid", "model.fp8_recipe=tensorwise"]), check_environment=False)


def _te_fp8_gemm_ok(leading: int, last: int) -> bool:
    """The FP8 GEMMs of one linear layer in forward and backward on Hopper. Forward: TE's Python check
    (transformer_engine/pytorch/utils.py ``assert_dim_for_fp8_exec``): tokens % 8 and last dim % 16. Backward: the
    weight-gradient GEMM reduces over the tokens and sm90 runs FP8 only as TN, so the tokens become a leading
    dimension that cuBLASLt requires % 16 (common/gemm/cublaslt_gemm.cu, "Caller must pad"). Together: both % 16."""
    forward = leading % 8 == 0 and last % 16 == 0
    wgrad = leading % 16 == 0
    return forward and wgrad


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    from megarank.data.tokenizer import build_tiny_tokenizer, load_tokenizer

    out = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(out)
    return load_tokenizer(out)


def _padded_lengths(cfg, tokenizer) -> list[int]:
    """Every sequence length PairTokenizer.pad can produce for this config (one row per real length)."""
    from megarank.data.tokenizer import PairTokenizer

    pt = PairTokenizer(tokenizer, max_length=cfg.data.max_length, pad_to_multiple_of=cfg.data.pad_to_multiple_of)
    return sorted({pt.pad([[1] * n])["input_ids"].shape[1] for n in range(1, cfg.data.max_length + 1)})


@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (2, True), (4, True)])
def test_sp_and_fp8_token_checks_are_exactly_what_every_padded_batch_needs(tp, sp, tiny_tokenizer):
    """validate() passes  <=>  every batch the data code can make (training micro-batches, evaluation batches
    of 1..eval_batch_size rows, every sequence length) splits evenly over TP under sequence parallelism and
    gives every FP8 GEMM on a rank a token count TE accepts."""
    for pad, max_length, fp8 in itertools.product([1, 4, 8, 16, 32], [100, 64], [None, "hybrid"]):
        overrides = [f"parallel.tensor_model_parallel_size={tp}", f"parallel.sequence_parallel={str(sp).lower()}",
                     f"data.pad_to_multiple_of={pad}", f"data.max_length={max_length}", "model.num_attention_heads=8",
                     "model.num_query_groups=4", "model.dtype=bf16", "data.eval_batch_size=8",
                     f"model.fp8={fp8 or 'null'}", "model.transformer_impl=auto"]
        cfg = load_config(TINY, overrides)
        train_rows = cfg.train.micro_batch_size * cfg.data.n_passages
        ok = True
        for seq in _padded_lengths(cfg, tiny_tokenizer):
            if sp and seq % tp:
                ok = False
            for rows in [train_rows, *range(1, cfg.data.eval_batch_size + 1)]:
                local_tokens = rows * seq // (tp if sp else 1)
                if fp8 and not _te_fp8_gemm_ok(local_tokens, cfg.model.hidden_size):
                    ok = False
        errors = validate_errors(cfg)
        assert (errors is None) == ok, (overrides, errors)
        if not ok:
            assert "data.pad_to_multiple_of" in errors


def test_fp8_weight_dims_are_checked_per_tp_rank():
    base = ["model.fp8=hybrid", "model.dtype=bf16", "data.pad_to_multiple_of=16", "model.transformer_impl=auto"]
    validate(load_config(TINY, base), check_environment=False)
    # ffn 200 / TP 1 = 200: linear_fc2's input dim is not a multiple of 16
    with pytest.raises(ConfigError, match="ffn_hidden_size per TP rank"):
        validate(load_config(TINY, base + ["model.ffn_hidden_size=200"]), check_environment=False)
    with pytest.raises(ConfigError, match="model.hidden_size"):
        validate(load_config(TINY, base + ["model.hidden_size=72", "model.num_attention_heads=4", "model.kv_channels=16"]),
                 check_environment=False)
    # 5 heads + 2 x 1 group of dim 4 = 28 rows: linear_qkv's output (the data-gradient GEMM's reduction) is not % 16
    with pytest.raises(ConfigError, match="linear_qkv output"):
        validate(load_config(TINY, base + ["model.num_attention_heads=5", "model.num_query_groups=1",
                                           "model.kv_channels=4", "model.hidden_size=64"]), check_environment=False)
    # ffn 24 at TP 2: linear_fc1's output per rank is 2 x 24 / 2 = 24, not % 16 (fc2's input 12 is reported too)
    with pytest.raises(ConfigError, match="linear_fc1 output"):
        validate(load_config(TINY, base + ["model.ffn_hidden_size=24", "parallel.tensor_model_parallel_size=2"]),
                 world_size=2, check_environment=False)


def test_launch_dry_run_prints_the_gpu_layout_errors_before_any_process_group(capsys):
    import torch.distributed as dist

    from megarank.cli.launch import main

    was_initialized = dist.is_initialized()
    rc = main(["--dry-run", "--nproc", "8", L8B, "model.fp8=hybrid", "model.fp8_recipe=delayed",
               "data.pad_to_multiple_of=8"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "model.fp8_first_last_bf16" in err and "data.pad_to_multiple_of (8) must be a multiple of" in err
    assert "Traceback" not in err
    assert dist.is_initialized() == was_initialized


# ----------------------------------------------------------------------------------------------- recompute


def test_8b_config_recompute_is_off_and_selective_options_reach_megatron(te_build_checks):
    cfg = load_config(L8B)
    assert cfg.model.recompute_granularity is None
    sel = load_config(L8B, ["model.recompute_granularity=selective", "model.recompute_modules=[mlp]"])
    c = gpu_config(sel)
    assert c.recompute_granularity == "selective" and c.recompute_modules == ["mlp"] and c.recompute_num_layers is None
    full = gpu_config(load_config(L8B, ["model.recompute_granularity=full", "model.recompute_num_layers=2"]))
    assert full.recompute_method == "uniform" and full.recompute_num_layers == 2
    with pytest.raises(ConfigError, match=r"model.recompute_modules\[0\]"):
        load_config(L8B, ["model.recompute_modules=[attention]"])


def test_selective_recompute_options_reach_every_layer_and_cpu_runs_are_refused(one_rank):
    """The layers megatron builds from recompute_modules mark what they will recompute. Running it needs CUDA:
    megatron's checkpoint saves the CUDA RNG state (tensor_parallel/random.py:444-449 -> torch.cuda.random.
    get_rng_state), so on CPU validate() refuses recompute in one sentence instead of a traceback mid-step."""
    from megarank.model import build_model

    rec = load_config(TINY, ["model.attention_backend=megatron", "model.recompute_granularity=selective",
                             "model.recompute_modules=[core_attn,mlp,layernorm]"])
    model = build_model(rec.model, rec.parallel)
    for layer in model.decoder.layers:
        assert layer.recompute_mlp and layer.recompute_input_layernorm and layer.recompute_pre_mlp_layernorm
        assert layer.self_attention.checkpoint_core_attention
    if not torch.cuda.is_available():
        for granularity in ("selective", "full"):
            with pytest.raises(ConfigError, match="model.recompute_granularity=" + granularity + " needs CUDA"):
                validate(load_config(TINY, [f"model.recompute_granularity={granularity}"]))
    validate(load_config(TINY, ["model.recompute_granularity=full"]), check_environment=False)


# ----------------------------------------------------------------------------------------------- init


def test_build_model_without_init_runs_no_init_and_loads_to_the_same_model(one_rank, tmp_path, monkeypatch):
    """init_weights=False (checkpoint.load / resume): megatron allocates without its init methods; after the
    strict load the model equals one built with init."""
    from megarank.checkpoint import load_model_weights, save_model_weights
    from megarank.model import build_model

    cfg = load_config(TINY)
    calls = []
    real_normal = torch.nn.init.normal_
    monkeypatch.setattr(torch.nn.init, "normal_", lambda t, *a, **k: calls.append(tuple(t.shape)) or real_normal(t, *a, **k))
    torch.manual_seed(0)
    source = build_model(cfg.model, cfg.parallel).eval()
    with_init = len(calls)
    calls.clear()
    skipped = build_model(cfg.model, cfg.parallel, init_weights=False).eval()
    assert not skipped.config.perform_initialization
    assert with_init > 4 * cfg.model.num_layers  # embedding, qkv, proj, fc1, fc2 per layer, head
    assert calls == [(cfg.model.num_labels, cfg.model.hidden_size)]  # only the tiny score head
    save_model_weights(source, tmp_path / "model")
    load_model_weights(skipped, tmp_path)
    ids = torch.randint(0, 256, (2, 8))
    valid = torch.ones(2, 8, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(skipped(ids, valid), source(ids, valid), rtol=0, atol=0)


def test_bf16_weights_loaded_after_the_optimizer_need_reload_model_params(one_rank, tmp_path):
    """bf16 keeps fp32 master weights in the optimizer, copied from the model when the optimizer is built.
    Weights loaded into the model afterwards (checkpoint.load, or a resume without optimizer state) must be
    copied again with ``optimizer.reload_model_params()`` (megatron-core optimizer.py:251-264); otherwise the
    first step writes the build-time weights back -- random init, or uninitialised memory with
    ``build_model(init_weights=False)``."""
    from megarank.checkpoint import load_model_weights, save_model_weights
    from megarank.model import build_model
    from megarank.training.optimizer import build_optimizer, wrap_ddp

    cfg = load_config(TINY, ["model.dtype=bf16", "train.lr=1e-9", "train.lr_warmup_steps=0"])
    torch.manual_seed(5)
    source = build_model(cfg.model, cfg.parallel)
    save_model_weights(source, tmp_path / "model")
    loaded = {k: v.detach().clone() for k, v in source.state_dict().items() if not k.endswith("_extra_state")}

    def first_step_drift(init_weights: bool, reload: bool) -> float:
        torch.manual_seed(6)
        model = build_model(cfg.model, cfg.parallel, init_weights=init_weights, ddp_training=True)
        ddp = wrap_ddp(model, cfg)
        optimizer = build_optimizer(ddp, cfg)
        load_model_weights(model, tmp_path)
        if reload:
            optimizer.reload_model_params()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        ddp(torch.randint(0, 256, (2, 8)), torch.ones(2, 8, dtype=torch.bool)).float().sum().backward()
        ddp.finish_grad_sync()
        optimizer.step()
        state = model.state_dict()
        return max(float((state[k].float() - v.float()).abs().max()) for k, v in loaded.items())

    assert first_step_drift(init_weights=False, reload=True) < 1e-6  # lr 1e-9: the loaded weights stay
    assert first_step_drift(init_weights=True, reload=True) < 1e-6
    assert first_step_drift(init_weights=True, reload=False) > 1e-2  # back to the random init

    # a resume from a checkpoint saved without optimizer state does the reload itself
    from megarank import checkpoint as ckpt

    state = {"step": 1, "scheduler": {}, "sampler": {}, "nonfinite": 0, "rng": ckpt.save_rng_state()}
    step_dir = ckpt.save_training_checkpoint(tmp_path / "run", 1, source, None, state, cfg)
    model = build_model(cfg.model, cfg.parallel, init_weights=False, ddp_training=True)
    ddp = wrap_ddp(model, cfg)
    optimizer = build_optimizer(ddp, cfg)
    from megarank.training.optimizer_state import MegatronOptimizerState

    ckpt.load_training_checkpoint(step_dir, model, MegatronOptimizerState(optimizer, model))
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    ddp(torch.randint(0, 256, (2, 8)), torch.ones(2, 8, dtype=torch.bool)).float().sum().backward()
    ddp.finish_grad_sync()
    optimizer.step()
    after = model.state_dict()
    assert max(float((after[k].float() - v.float()).abs().max()) for k, v in loaded.items()) < 1e-6


# ----------------------------------------------------------------------------------------------- DDP overlap


def _overlap_runs():
    """On each of two gloo ranks: 3 steps of plain DDP, then 3 of overlapped DDP, from the same weights.
    After each step: the weights as read right away, then after a no-grad forward (steps 1, 3) or after
    ``start_param_sync(force_sync=True)`` (step 2)."""
    import torch.distributed as dist

    from megarank.model import build_model
    from megarank.parallel.init import init_distributed
    from megarank.training.optimizer import build_optimizer, build_scheduler, wrap_ddp

    cfg = load_config(TINY, ["train.lr_warmup_steps=0"])
    init_distributed(1, 1, "gloo", seed=1)
    results = []
    for force_gpu_settings in (False, True):
        torch.manual_seed(1)
        model = build_model(cfg.model, cfg.parallel)
        ddp = wrap_ddp(model, cfg, cuda=force_gpu_settings, syncs_params_before_reads=True)
        flags = (ddp.ddp_config.overlap_grad_reduce, ddp.ddp_config.overlap_param_gather)
        optimizer = build_optimizer(ddp, cfg)
        scheduler = build_scheduler(optimizer, cfg)
        g = torch.Generator().manual_seed(dist.get_rank())
        read_now, read_later = [], []
        for step in range(3):
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            ids = torch.randint(0, 256, (4, 16), generator=g)
            ddp(ids, torch.ones(4, 16, dtype=torch.bool)).float().square().mean().backward()
            ddp.finish_grad_sync()
            optimizer.step()
            scheduler.step(1)
            read_now.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
            if step == 1 and ddp.use_forward_hook:
                ddp.start_param_sync(force_sync=True)  # what a save must do first
            else:
                with torch.no_grad():  # e.g. an evaluation batch: the pre-hooks gather first
                    ddp(ids, torch.ones(4, 16, dtype=torch.bool))
            read_later.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        results.append((flags, read_now, read_later))
    return results


@pytest.mark.slow  # two spawned gloo ranks, each importing megatron and running 6 DDP steps
def test_overlapped_grad_reduce_and_param_gather_match_plain_ddp_on_two_gloo_ranks():
    """The GPU-only overlaps run on CPU with gloo when forced: the same weights as plain DDP after every
    step (distributed optimizer, DP=2) once a forward or start_param_sync has gathered them; read right
    after the step, the other rank's shard is still the old one -- why a checkpoint save must sync first."""
    from tests.dist_utils import run_distributed

    for (plain, overlapped) in run_distributed(_overlap_runs, 2, timeout=300):
        assert plain[0] == (False, False) and overlapped[0] == (True, True)
        for now, later in zip(plain[1], plain[2]):
            torch.testing.assert_close(now, later, rtol=0, atol=0)
        for reference, now, later in zip(plain[2], overlapped[1], overlapped[2]):
            torch.testing.assert_close(later, reference, rtol=0, atol=0)
            assert float((now - reference).abs().max()) > 0


def test_wrap_ddp_overlaps_only_on_gpu_and_param_gather_only_for_callers_that_sync(one_rank):
    from megarank.model import build_model
    from megarank.training.optimizer import wrap_ddp

    cfg = load_config(TINY)
    flags = {}
    for cuda, syncs in [(False, True), (True, False), (True, True)]:
        ddp = wrap_ddp(build_model(cfg.model, cfg.parallel), cfg, cuda=cuda, syncs_params_before_reads=syncs)
        flags[cuda, syncs] = (ddp.ddp_config.overlap_grad_reduce, ddp.ddp_config.overlap_param_gather)
    assert flags == {(False, True): (False, False), (True, False): (True, False), (True, True): (True, True)}
    nodist = load_config(TINY, ["parallel.use_distributed_optimizer=false"])
    ddp = wrap_ddp(build_model(nodist.model, nodist.parallel), nodist, cuda=True, syncs_params_before_reads=True)
    assert not ddp.ddp_config.overlap_param_gather  # nothing to gather without the distributed optimizer


# ----------------------------------------------------------------------------------------------- environment


def test_launcher_gives_workers_cuda_device_max_connections_1(monkeypatch, capsys):
    from megarank.cli import launch
    from megarank.parallel.init import cuda_max_connections_problem

    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "8")
    assert launch.worker_env() == {}  # an explicit setting is kept
    assert "CUDA_DEVICE_MAX_CONNECTIONS is '8'" in cuda_max_connections_problem(2)
    assert cuda_max_connections_problem(1) is None  # no TP communication to overlap
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS")
    assert launch.worker_env() == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    assert cuda_max_connections_problem(2) is not None
    assert launch.main(["--dry-run", "--nproc", "2", TINY]) == 0
    assert "# worker environment: CUDA_DEVICE_MAX_CONNECTIONS=1" in capsys.readouterr().out

    seen = {}

    def fake_agent(torchrun_args):  # the launcher runs torchrun's agent in its own process
        seen.update(env=dict(launch.os.environ), argv=list(torchrun_args))
        return 0

    monkeypatch.setattr(launch, "run_agent", fake_agent)
    assert launch.main(["--nproc", "2", TINY]) == 0
    assert seen["env"]["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"  # inherited by torchrun and every worker
    assert cuda_max_connections_problem(2) is None


def test_te_in_fp32_cannot_pack_so_training_is_refused_and_scoring_pads(monkeypatch):
    """Transformer Engine has no fp32 attention backend for THD (flash/fused need bf16/fp16, unfused refuses THD):
    validate names data.packing and model.dtype for a training run; a scorer resolved to fp32 scores padded."""
    import megarank.config as config
    from megarank.scoring.reranker import _padded_where_packing_cannot_run

    monkeypatch.setattr(config, "transformer_engine_available", lambda: True)  # a GPU with TE, as far as this goes
    te_fp32 = load_config(TINY, ["model.transformer_impl=auto", "model.dtype=fp32", "data.packing=true"])
    with pytest.raises(ConfigError, match=r"data.packing with model.dtype fp32: Transformer Engine has no fp32"):
        validate(te_fp32, check_environment=True)
    assert config.packed_attention_problem(load_config(TINY, ["model.transformer_impl=auto", "model.dtype=bf16"]).model) is None
    assert config.packed_attention_problem(load_config(TINY, ["model.transformer_impl=local", "model.dtype=fp32"]).model) is None
    validate(load_config(TINY, ["model.transformer_impl=auto", "model.dtype=fp32", "data.packing=false"]),
             check_environment=True)
    _padded_where_packing_cannot_run(te_fp32)
    assert te_fp32.data.packing is False
    bf16 = load_config(TINY, ["model.transformer_impl=auto", "model.dtype=bf16", "data.packing=true"])
    _padded_where_packing_cannot_run(bf16)
    assert bf16.data.packing is True
    monkeypatch.setattr(config, "transformer_engine_available", lambda: False)  # this CPU: local spec, SDPA
    local = load_config(TINY, ["model.transformer_impl=auto", "model.dtype=fp32", "data.packing=true"])
    _padded_where_packing_cannot_run(local)
    assert local.data.packing is True
