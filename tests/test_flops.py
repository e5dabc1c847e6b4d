"""megarank/training/flops.py: the model-FLOPs formula against torch's FlopCounterMode on a real forward+backward.

torch.utils.flop_counter counts every matmul the tiny model executes (forward and backward) with its own
formulas. It has none for the CPU flash-attention kernel SDPA runs here, so the test maps that kernel to
torch's own SDPA formulas (``sdpa_flop_count`` / ``sdpa_backward_flop_count``). torch's backward formula
includes flash attention's recomputation of the scores (one forward score matmul, half of the attention
forward), which model FLOPs leave out; the comparison subtracts exactly that.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
PAD_ID = 258




def _model(*overrides):
    from megarank.config import load_config
    from megarank.model import build_model

    cfg = load_config(TINY, list(overrides))
    torch.manual_seed(0)
    return cfg.model, build_model(cfg.model, cfg.parallel).train()


def _padded(lengths, seed=0, multiple=8) -> dict:
    g = torch.Generator().manual_seed(seed)
    seq = -(-max(lengths) // multiple) * multiple
    ids = torch.randint(0, 256, (len(lengths), seq), generator=g)
    valid = torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]
    ids[~valid] = PAD_ID
    return {"input_ids": ids, "attention_mask": valid, "group_size": len(lengths)}


def _counted(model, batch) -> dict:
    """torch's FLOP counts of one forward + backward, by kind: mm (linears), attention forward / backward."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    from megarank.model.inputs import model_inputs

    aten = torch.ops.aten
    fwd_op = aten._scaled_dot_product_flash_attention_for_cpu
    bwd_op = aten._scaled_dot_product_flash_attention_for_cpu_backward
    mapping = {
        # (query, key, value, ...) and (grad_out, query, key, value, ...), shapes [b, heads, s, d]
        fwd_op: lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v),
        bwd_op: lambda g, q, k, v, *args, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v),
    }
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        args, kwargs = model_inputs(batch, "cpu")
        model(*args, **kwargs).sum().backward()
    model.zero_grad()
    counts = counter.get_flop_counts()["Global"]
    other = {str(op) for op in counts} - {"aten.mm", "aten.addmm", str(fwd_op), str(bwd_op)}
    return {"mm": counts.get(aten.mm, 0) + counts.get(aten.addmm, 0), "attn_fwd": counts.get(fwd_op, 0),
            "attn_bwd": counts.get(bwd_op, 0), "other": other}


def _model_flops_counted(c: dict) -> int:
    assert c["attn_fwd"] > 0 and c["attn_bwd"] == 5 * c["attn_fwd"] // 2  # torch: 5 score-sized matmuls vs 2
    return c["mm"] + c["attn_fwd"] + c["attn_bwd"] - c["attn_fwd"] // 2  # minus the recomputed scores


@pytest.mark.parametrize("overrides", [[], ["model.kv_channels=24", "model.ffn_hidden_size=96", "model.num_labels=3"]],
                         ids=["tiny-gqa", "kv_channels-24"])
def test_training_flops_equal_torch_flop_counter(one_rank, overrides):
    from megarank.data.packing import pack_padded
    from megarank.training.flops import micro_batches_flops, training_flops

    m, model = _model(*overrides)
    assert m.num_query_groups < m.num_attention_heads  # GQA: K/V projections narrower than Q
    lengths = [16, 11, 5, 1, 9, 16]
    padded = _padded(lengths)
    packed = pack_padded(padded, PAD_ID, multiple=1)  # no end padding: torch counts exactly the real tokens
    assert packed["packed_seq_params"].seqlens == tuple(lengths)
    counted = _counted(model, packed)
    assert not counted["other"], counted["other"]
    assert training_flops(m, lengths) == _model_flops_counted(counted)
    # The same count from the micro-batch dicts, packed or padded: real lengths, never the padding.
    assert micro_batches_flops(m, [packed]) == micro_batches_flops(m, [padded]) == training_flops(m, lengths)
    stream32 = pack_padded(padded, PAD_ID, multiple=32)
    assert stream32["packed_seq_params"].seqlens[-1] > 0
    assert micro_batches_flops(m, [stream32]) == training_flops(m, lengths)
    # What the padded batch executes is more (6 x 16 tokens): MFU counts only the useful part.
    executed = _model_flops_counted(_counted(model, padded))
    assert executed == training_flops(m, [padded["input_ids"].shape[1]] * len(lengths)) > training_flops(m, lengths)


def test_attention_is_per_sequence_and_mfu_arithmetic():
    from megarank.config import load_config
    from megarank.training.flops import forward_flops, mfu, peak_dtype

    m = load_config(TINY, []).model
    # Two sequences of 8 cost less than one of 16 by exactly the attention of the cross terms (2 x 8 x 8).
    q = m.num_attention_heads * (m.hidden_size // m.num_attention_heads)
    head = 2 * m.hidden_size * m.num_labels
    assert forward_flops(m, [16]) - (forward_flops(m, [8, 8]) - head) == m.num_layers * 4 * q * (16**2 - 2 * 8**2)
    assert mfu(6e12, 2.0, 1e12, 4) == pytest.approx(0.75)  # 3 TFLOP/s over 4 devices of 1 TFLOP/s
    assert peak_dtype(m) == "fp32"
    assert peak_dtype(load_config(TINY, ["model.dtype=bf16", "model.fp8=hybrid"]).model) == "fp8"


def test_log_line_shows_mfu_and_na_when_the_peak_is_unknown(caplog, tmp_path):
    import logging
    import math

    from megarank.training.logger import MetricsLogger
    from tests.training_harness import LOG_LINE, tb_scalars

    metrics = {"loss": 1.0, "acc": 0.5, "mrr": 0.7, "lr": 1e-3, "grad_norm": 0.3, "tokens_per_s": 1234.0}
    logger = MetricsLogger(True, 10, str(tmp_path))
    with caplog.at_level(logging.INFO, logger="megarank.train"):
        logger.step(1, {**metrics, "mfu": 0.4567}, 1)
        logger.step(2, {**metrics, "mfu": math.nan}, 2)  # a GPU hardware.peak_flops does not know
    logger.close()
    lines = [LOG_LINE.search(r.getMessage()) for r in caplog.records]
    assert [m["mfu"] for m in lines] == ["45.7%", "n/a"]
    assert tb_scalars(tmp_path, "train/mfu") == {1: pytest.approx(0.4567)}  # no NaN scalar
