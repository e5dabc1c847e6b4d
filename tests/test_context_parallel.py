"""Context parallelism on CPU (gloo): CP=2 gives the CP=1 scores, loss and every gradient, padded and packed.

Sequences of up to ~2,000 tokens (the tiny model, fp32). Each layout loads the same starting weights (saved by the
CP=1 run), runs one training step's forward+backward through megatron's schedule on a megatron DDP-wrapped model --
so the gradients are the ones DDP reduces over data x context ranks (``dp_cp_group``) and megatron's CP loss scaling
(schedules.py) is in play -- and writes the reduced gradients as a dist checkpoint in global layout.

The reference is CP=1 on the same two ranks (DP=2, both ranks the same batch, so the DP average is the gradient).
Layouts: CP=2 padded and packed, each pooling (avg, last, cls); CP=2 x TP=2 (sequence parallel) and CP=2 x PP=2 on
four ranks. Scores must also be identical on the two CP ranks of a replica.
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.test_parallel_model import _plain, assert_rel_close

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
GROUP, N_MICRO = 3, 2  # 2 micro-batches of one query group of 3 passages
PAD_ID, VOCAB = 258, 259
LENGTHS = [(1990, 1203, 617), (1500, 1788, 33)]  # real tokens per row, per micro-batch


def _config(tp=1, pp=1, cp=1, sp=False, pooling="avg", packing=False, extra=()):
    from megarank.config import load_config

    return load_config(TINY, [
        f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}",
        f"parallel.context_parallel_size={cp}", f"parallel.sequence_parallel={str(sp).lower()}",
        f"model.pooling={pooling}", f"data.packing={str(packing).lower()}", "parallel.use_distributed_optimizer=false",
        *extra,
    ])


def _micro_batches(packed: bool, multiple: int, seq_multiple: int) -> list:
    """The two micro-batches (same on every rank), right-padded to a multiple or packed, as the Batcher makes them."""
    from megarank.data.packing import pack_rows

    g = torch.Generator().manual_seed(0)
    batches = []
    for lengths in LENGTHS:
        rows = [torch.randint(0, VOCAB - 3, (n,), generator=g).tolist() for n in lengths]
        if packed:
            batches.append(pack_rows(rows, PAD_ID, multiple, seq_multiple))
            continue
        s = -(-max(lengths) // multiple) * multiple
        ids = torch.full((len(rows), s), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(rows), s), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = True
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def listwise_loss(scores: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over the group, the positive first."""
    logits = scores.float().view(-1, GROUP)
    return torch.nn.functional.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


def _loss_func(captured: list, scores):
    captured.append(scores.detach().clone())
    loss = listwise_loss(scores)
    return loss, {"loss": loss.detach().clone()}


def _forward_step(captured: list, data_iterator, model):
    from megarank.model.inputs import model_inputs
    from megarank.parallel.init import device

    args, kwargs = model_inputs(next(data_iterator), device())
    return model(*args, **kwargs), functools.partial(_loss_func, captured)


def _run(tag: str, root: Path, *, tp=1, pp=1, cp=1, sp=False, pooling="avg", packed=False, save_weights=False,
         extra=()) -> dict:
    from megarank.checkpoint import load_model_weights, save_model_weights
    from megarank.data.packing import packing_multiple
    from megarank.model import build_model
    from megarank.parallel.init import init_distributed

    cfg = _config(tp, pp, cp, sp, pooling, packed, extra)
    init_distributed(tp=tp, pp=pp, cp=cp, seed=cfg.train.seed)
    model = build_model(cfg.model, cfg.parallel, ddp_training=True)
    weights = root / "weights" / "model"
    if save_weights:
        save_model_weights(model, weights)
    else:
        load_model_weights(model, weights)
    multiple = packing_multiple(1, tp, cp) if (packed or cp > 1) else 1
    batches = _micro_batches(packed, multiple, 2 * cp if packed and cp > 1 else 1)
    return _step_and_save_grads(model, cfg, batches, root / f"grads-{tag}")


def _step_and_save_grads(model, cfg, batches, grads_dir: Path) -> dict:
    """One forward+backward of ``batches`` on the DDP-wrapped model through megatron's schedule; the reduced
    gradients written as a dist checkpoint (global layout) to ``grads_dir``. -> scores and loss (last stage)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megarank.checkpoint import save_model_weights
    from megarank.training.optimizer import wrap_ddp

    ddp = wrap_ddp(model, cfg)
    captured: list = []
    ddp.zero_grad_buffer()
    reduced = get_forward_backward_func()(
        forward_step_func=functools.partial(_forward_step, captured), data_iterator=iter(batches), model=[ddp],
        num_microbatches=N_MICRO, seq_length=batches[0]["input_ids"].shape[1], micro_batch_size=GROUP,
        forward_only=False)
    # megatron's finalize_model_grads (model.config.finalize_model_grads_func, set by wrap_ddp and called by the
    # schedule): DDP's all-reduce over data x context ranks (dp_cp_group, averaged) and, under sequence parallel, the
    # norms' partial gradients summed over TP.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.main_grad)
    save_model_weights(model, grads_dir)
    if not captured:
        return {"scores": None, "loss": None}
    return {"scores": torch.cat(captured), "loss": torch.stack([r["loss"] for r in reduced]).mean()}


def _two_rank(root: str) -> dict:
    root = Path(root)
    out = {}
    for pooling in ("avg", "last", "cls"):
        out[f"cp1-{pooling}"] = _run(f"cp1-{pooling}", root, pooling=pooling, save_weights=pooling == "avg")
        out[f"cp2-{pooling}"] = _run(f"cp2-{pooling}", root, cp=2, pooling=pooling)
        out[f"cp2-packed-{pooling}"] = _run(f"cp2-packed-{pooling}", root, cp=2, pooling=pooling, packed=True)
    return out


def _four_rank(root: str) -> dict:
    root = Path(root)
    return {"cp2-tp2sp": _run("cp2-tp2sp", root, cp=2, tp=2, sp=True, packed=True),
            "cp2-pp2": _run("cp2-pp2", root, cp=2, pp=2)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cp")
    two = run_distributed(_two_rank, 2, str(root), timeout=900)
    four = run_distributed(_four_rank, 4, str(root), timeout=900)
    return root, two, four


def _grads_match(root: Path, tag: str, ref: str):
    expected_all, got_all = _plain(root / f"grads-{ref}"), _plain(root / f"grads-{tag}")
    assert set(got_all) == set(expected_all)
    for key, expected in expected_all.items():
        actual = got_all[key]
        if "word_embeddings" in key:  # padded to a multiple of 64 x TP: compare the real vocabulary rows
            actual, expected = actual[:VOCAB], expected[:VOCAB]
        assert expected.abs().max() > 0, f"{key}: reference gradient is all zero"
        assert_rel_close(actual, expected, f"{tag} grad {key}")


@pytest.mark.parametrize("pooling", ["avg", "last", "cls"])
@pytest.mark.parametrize("layout", ["cp2", "cp2-packed"])
def test_cp2_equals_cp1(runs, layout, pooling):
    root, two, _ = runs
    ref = two[0][f"cp1-{pooling}"]
    for rank in (0, 1):  # both CP ranks score every sequence identically
        got = two[rank][f"{layout}-{pooling}"]
        assert_rel_close(got["scores"], ref["scores"], f"{layout} {pooling} scores (rank {rank})")
        assert_rel_close(got["loss"], ref["loss"], f"{layout} {pooling} loss (rank {rank})")
    assert torch.equal(two[0][f"{layout}-{pooling}"]["scores"], two[1][f"{layout}-{pooling}"]["scores"])
    _grads_match(root, f"{layout}-{pooling}", f"cp1-{pooling}")


@pytest.mark.parametrize("layout", ["cp2-tp2sp", "cp2-pp2"])
def test_cp2_with_tp_and_pp(runs, layout):
    root, two, four = runs
    ref = two[0]["cp1-avg"]
    last = [r[layout] for r in four if r[layout]["scores"] is not None]
    assert last, "no rank returned scores"
    for got in last:
        assert_rel_close(got["scores"], ref["scores"], f"{layout} scores")
        assert_rel_close(got["loss"], ref["loss"], f"{layout} loss")
    _grads_match(root, layout, "cp1-avg")


def test_split_is_dual_chunk_swap():
    """The split megatron's get_batch_on_this_cp_rank and TE's thd_get_partitioned_indices make (TE's own test:
    cu_seqlens [0, 8, 16], CP 2 -> rank 0 [0, 1, 6, 7, 8, 9, 14, 15], rank 1 [2, 3, 4, 5, 10, 11, 12, 13])."""
    from megarank.parallel.context import PackedShard, chunk_positions

    assert chunk_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert PackedShard.of((8, 8), (8, 8), 2, 0, None).index.tolist() == [0, 1, 6, 7, 8, 9, 14, 15]
    assert PackedShard.of((8, 8), (8, 8), 2, 1, None).index.tolist() == [2, 3, 4, 5, 10, 11, 12, 13]
    with pytest.raises(ValueError, match="multiple of 2 x CP = 4"):
        chunk_positions(6, 2, 0)


# ----------------------------------------------------------------------------------------------- the TE path, on CPU

def _fake_te_cp_attention():
    """Transformer Engine's context-parallel attention as megatron drives it, written from TE's contract (not from
    megarank's SDPA path): ``TEDotProductAttention`` gets the CP group from ``pg_collection.cp`` and ``cp_comm_type``
    from the layer when ``config.context_parallel_size > 1`` (extensions/transformer_engine.py:1228-1252); for THD,
    TE's ``attn_forward_func_with_cp`` requires ``cu_seqlens_*_padded`` (global, every sequence a multiple of
    2 x CP), takes ``cu_seqlens_*`` of the real tokens, and expects each rank's tokens in DualChunkSwap order, by
    sequence (context_parallel.py docstring). Keys are all-gathered here (what the ring computes), positions and
    masks derived from the cu_seqlens alone."""
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_nn
    from megatron.core import parallel_state
    from megatron.core.transformer.module import MegatronModule

    class FakeTECPAttention(MegatronModule):
        calls: list = []

        def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                     softmax_scale=None, cp_comm_type=None, pg_collection=None, **kwargs):
            super().__init__(config=config)
            assert config.context_parallel_size > 1
            self.cp_group = pg_collection.cp if pg_collection is not None else parallel_state.get_context_parallel_group()
            self.cp_comm_type = cp_comm_type
            self.scale = softmax_scale or config.kv_channels ** -0.5
            self.attn_mask_type = attn_mask_type

        def forward(self, q, k, v, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
            p = packed_seq_params
            cp, t = dist.get_world_size(self.cp_group), q.shape[0]
            FakeTECPAttention.calls.append((p.qkv_format, self.cp_comm_type, p.max_seqlen_q))
            assert p.qkv_format == "thd" and p.cu_seqlens_q_padded is not None and p.cu_seqlens_kv_padded is not None
            assert "padding" in (attn_mask_type or self.attn_mask_type).name
            padded, real = p.cu_seqlens_q_padded.tolist(), p.cu_seqlens_q.tolist()
            assert padded[-1] == cp * t and len(real) == len(padded)
            k_all, v_all = (torch.cat(dist_nn.all_gather(x.contiguous(), group=self.cp_group)) for x in (k, v))
            rep = q.shape[1] // k.shape[1]
            outs = []
            for i in range(len(padded) - 1):
                size, length = padded[i + 1] - padded[i], real[i + 1] - real[i]
                assert size % (2 * cp) == 0 and 0 < length <= size
                c, start = size // (2 * cp), padded[i] // cp
                keys, pos = [], []
                for r in range(cp):
                    keys.append(torch.arange(r * t + start, r * t + start + 2 * c))
                    pos += list(range(r * c, (r + 1) * c)) + list(range((2 * cp - 1 - r) * c, (2 * cp - r) * c))
                keys, pos = torch.cat(keys), torch.tensor(pos)
                qi = q[start : start + 2 * c].transpose(0, 1)  # [np, n, d]
                ki, vi = (x[keys].repeat_interleave(rep, dim=1).transpose(0, 1) for x in (k_all, v_all))
                logits = (qi @ ki.transpose(1, 2)) * self.scale
                logits = logits.masked_fill(~(pos < length)[None, None, :], float("-inf"))
                outs.append((logits.softmax(-1) @ vi).transpose(0, 1))
            return torch.cat(outs).reshape(t, -1)

    return FakeTECPAttention


def _install_fake_te():
    from megatron.core.models.gpt import gpt_layer_specs

    from tests.test_spec_te import _fake_te_classes

    provider, _ = _fake_te_classes()
    attention = _fake_te_cp_attention()

    class CPProvider(provider):
        def core_attention(self):
            return attention

    gpt_layer_specs.HAVE_TE = True
    gpt_layer_specs.TESpecProvider = CPProvider
    return attention


def _run_te_cp(root: Path) -> dict:
    """The tiny model on megatron's TE spec (CPU stand-ins) at CP=2, packed, bf16 rules aside (fp32): megatron's THD
    RoPE under CP, TE's CP attention contract, megarank's pooling; gradients through DDP as in ``_run``."""

    from megarank.checkpoint import load_model_weights
    from megarank.config import padded_vocab_size
    from megarank.data.packing import packing_multiple
    from megarank.model.reranker import LlamaReranker
    from megarank.model.spec import block_spec
    from megarank.model.transformer_config import make_transformer_config
    from megarank.parallel.init import init_distributed

    attention = _install_fake_te()
    cfg = _config(cp=2, packing=True)
    init_distributed(cp=2, seed=cfg.train.seed)
    m = cfg.model
    config = make_transformer_config(m, cfg.parallel, "transformer_engine", cuda=False, ddp_training=True)
    model = LlamaReranker(config, block_spec(config, "transformer_engine"),
                          padded_vocab_size=padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, 1),
                          rope_theta=m.rope_theta, rope_scaling=m.rope_scaling, pooling=m.pooling)
    assert not model.core_rope  # megatron applies RoPE (its THD path with the CP group)
    load_model_weights(model, root / "weights" / "model")
    out = _step_and_save_grads(model, cfg, _micro_batches(True, packing_multiple(1, 1, 2), 4), root / "grads-te-cp2")
    return {**out, "calls": list(attention.calls)}


def _te_two_rank(root: str) -> dict:
    root = Path(root)
    return {"ref": _run("te-ref", root, save_weights=True), "te": _run_te_cp(root)}


def test_te_spec_under_cp_matches_cp1(tmp_path):
    """megarank's wiring of the TE path under CP, run on CPU: megatron's TE layer spec with stand-ins, megatron's
    THD RoPE with the CP group, a TE-contract CP attention -> the CP=1 local scores, loss and gradients."""
    out = run_distributed(_te_two_rank, 2, str(tmp_path), timeout=600)
    ref = out[0]["ref"]
    for rank in (0, 1):
        te = out[rank]["te"]
        assert te["calls"] and {c[:2] for c in te["calls"]} == {("thd", "p2p")}
        assert_rel_close(te["scores"], ref["scores"], f"TE CP=2 scores (rank {rank})")
        assert_rel_close(te["loss"], ref["loss"], f"TE CP=2 loss (rank {rank})")
    _grads_match(tmp_path, "te-cp2", "te-ref")


def test_validate_names_what_cp_needs():
    from megarank.config import ConfigError, load_config, validate

    def problems(*overrides, world=2):
        try:
            validate(load_config(TINY, ["parallel.context_parallel_size=2", *overrides]), world_size=world,
                     check_environment=False)
        except ConfigError as e:
            return str(e)
        return ""

    assert problems() == ""
    assert "model.attention_backend sdpa" in problems("model.attention_backend=megatron")
    assert "needs data.packing=true" in problems("model.transformer_impl=transformer_engine", "model.dtype=bf16",
                                                 "data.packing=false")
    assert problems("model.transformer_impl=transformer_engine", "model.dtype=bf16", "data.packing=true") == ""
    assert "world size 3 is not divisible by tensor x pipeline x context parallel size (1 x 1 x 2 = 2)" in problems(world=3)
    assert "parallel.context_parallel_size must be >= 1" in problems("parallel.context_parallel_size=0")


def test_batcher_pads_for_cp():
    """Padded rows to a multiple of 2 x CP x TP; packed sequences each to 2 x CP inside their segment, the stream
    to 2 x CP x TP; token budgets count that padding."""
    from megarank.data.batcher import Batcher

    class Tok:
        pad_id, pad_to_multiple_of = 0, None

        def pad(self, rows, multiple=0):
            from megarank.data.tokenizer import round_up

            s = round_up(max(map(len, rows)), multiple or self.pad_to_multiple_of)
            return {"input_ids": torch.zeros(len(rows), s, dtype=torch.long), "attention_mask": torch.ones(len(rows), s)}

    rows = [[1] * 5, [2] * 9]
    assert Batcher(Tok(), context_parallel_size=2, tensor_parallel_size=2).batch(rows)["input_ids"].shape == (2, 16)
    packed = Batcher(Tok(), packed=True, context_parallel_size=2, tensor_parallel_size=2)
    batch = packed.batch(rows)
    layout = batch["packed_seq_params"]
    assert layout.seqlens == (8, 12, 4) and layout.real_lengths == (5, 9, 4) and batch["input_ids"].shape == (1, 24)
    assert batch["attention_mask"][0].tolist() == [True] * 5 + [False] * 3 + [True] * 9 + [False] * 7
    assert packed.cost([5, 9]) == 24
    from megarank.data.packing import packing_multiple

    # each rank's share keeps the pad multiple (FP8: 16 tokens per rank) and splits over TP
    assert packing_multiple(16, 1, 2) == 32 and packing_multiple(16, 2, 2) == 32 and packing_multiple(1, 2, 4) == 16


# ----------------------------------------------------------------------------------------------- on two GPUs

def _two_gpus() -> bool:
    from megarank.config import transformer_engine_available

    return transformer_engine_available() and torch.cuda.device_count() >= 2


def _te_gpu(root: str) -> dict:
    root = Path(root)
    te = ["model.transformer_impl=transformer_engine", "model.dtype=bf16"]
    return {"cp1": _run("gpu-cp1", root, packed=True, save_weights=True, extra=te),
            "cp2": _run("gpu-cp2", root, cp=2, packed=True, extra=te)}


@pytest.mark.gpu
@pytest.mark.skipif(not _two_gpus(), reason="needs Transformer Engine and two CUDA devices (CP=2 over NCCL)")
def test_te_cp2_equals_cp1_in_bf16_on_two_gpus(tmp_path):
    """Transformer Engine's own context-parallel attention (p2p ring, THD) in bf16: CP=2 gives the CP=1 scores
    (both TE, both packed, the same weights) within bf16's rounding, and gradients pointing the same way."""
    out = run_distributed(_te_gpu, 2, str(tmp_path), timeout=600, cpu_only=False)
    ref = out[0]["cp1"]
    for rank in (0, 1):
        got = out[rank]["cp2"]
        assert_rel_close(got["scores"].float().cpu(), ref["scores"].float().cpu(), f"TE CP=2 scores, rank {rank}",
                         rtol=2e-2)
    expected_all, got_all = _plain(tmp_path / "grads-gpu-cp1"), _plain(tmp_path / "grads-gpu-cp2")
    for key, expected in expected_all.items():
        a, e = got_all[key].double().flatten(), expected.double().flatten()
        cosine = (a @ e / (a.norm() * e.norm()).clamp(min=1e-30)).item()
        assert cosine >= 0.99, f"{key}: gradient cosine {cosine:.4f}"
