"""Per-GPU memory of training, from the config alone (``megarank launch --dry-run``): the weights, the gradient
buffer and the optimizer state of the fullest pipeline stage, for full fine-tuning and for LoRA. No torch here:
it runs on a login node.

What is counted, per GPU (one rank of the fullest pipeline stage: the first holds the embedding, the last the
final norm and head; each holds num_layers / PP layers):

- weights: every parameter of the stage at its TP split (embedding rows, the column-parallel linears' rows and the
  row-parallel ones' columns divided by TP; norms and the score head whole) in ``model.dtype``; LoRA adapters add
  their A and B (model/adapters.py: column base A ``[r/tp, in]``, B ``[out/tp, r]``; row base A ``[r, in/tp]``,
  B ``[out, r]``);
- gradients: megatron DDP's buffer, fp32 (``grad_reduce_in_fp32``, training/optimizer.py), one value per parameter
  that trains (all of them, or the adapters + head with LoRA: DDP buckets only those,
  distributed_data_parallel.py:112);
- optimizer: Adam's two fp32 moments, plus an fp32 master copy when ``model.dtype`` is not fp32, per trained
  parameter, divided over the data-parallel ranks with the distributed optimizer (ZeRO-1).

Not counted: activations (they depend on the spec, the attention kernel and recomputation; not estimated yet),
buffer padding to bucket sizes, temporaries, the CUDA context and allocator slack.
"""
from __future__ import annotations

from dataclasses import dataclass

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class StageParams:
    """Parameters one GPU of a pipeline stage holds (``total``) and trains (``trained``)."""

    total: int
    trained: int


def _layer_params(m, tp: int) -> int:
    h, f, d = m.hidden_size, m.ffn_hidden_size, m.head_dim
    qkv = (m.num_attention_heads + 2 * m.num_query_groups) * d
    return 2 * h + (qkv // tp) * h + h * (m.num_attention_heads * d // tp) + (2 * f // tp) * h + h * (f // tp)


def _adapter_params(m, tp: int) -> int:
    """One layer's adapters at this TP split (model/adapters.py)."""
    h, f, d, r = m.hidden_size, m.ffn_hidden_size, m.head_dim, m.lora_rank
    qkv, attn = (m.num_attention_heads + 2 * m.num_query_groups) * d, m.num_attention_heads * d
    per_target = {"linear_qkv": (r // tp) * h + (qkv // tp) * r, "linear_proj": r * (attn // tp) + h * r,
                  "linear_fc1": (r // tp) * h + (2 * f // tp) * r, "linear_fc2": r * (f // tp) + h * r}
    return sum(per_target[t] for t in m.lora_targets)


def stage_params(m, tp: int, pp: int, lora: bool) -> StageParams:
    """The fullest stage's parameters per GPU: the first stage has the embedding, the last the final norm and
    the head (one stage has all three when PP = 1)."""
    layers = m.num_layers // pp
    adapters = layers * _adapter_params(m, tp) if lora else 0
    body = layers * _layer_params(m, tp) + adapters
    embedding = m.padded_vocab(tp) // tp * m.hidden_size
    head, final_norm = m.hidden_size * m.num_labels, m.hidden_size
    head_trained = head + (final_norm if m.lora_train_final_norm else 0)
    if pp == 1:
        stages = [(body + embedding + head + final_norm, adapters + head_trained)]
    else:
        stages = [(body + embedding, adapters), (body + head + final_norm, adapters + head_trained)]
    return max((StageParams(total, trained if lora else total) for total, trained in stages),
               key=lambda s: (s.total, s.trained))


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    params: StageParams

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer


def estimate(cfg, data_parallel: int, lora: bool) -> MemoryEstimate:
    m, p = cfg.model, cfg.parallel
    params = stage_params(m, p.tensor_model_parallel_size, p.pipeline_model_parallel_size, lora)
    state = 8 + (4 if m.dtype != "fp32" else 0)
    optimizer = params.trained * state
    if p.use_distributed_optimizer:
        optimizer = -(-optimizer // data_parallel)
    return MemoryEstimate(params.total * DTYPE_BYTES[m.dtype], params.trained * 4, optimizer, params)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def report(cfg, data_parallel: int) -> list:
    """Dry-run lines: the estimate for this config's mode first, then the other one (full vs LoRA at rank
    ``model.lora_rank``, or at 16 when LoRA is off)."""
    import dataclasses

    lines = []
    lora_cfg = cfg if cfg.model.lora_rank else dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, lora_rank=16))
    modes = [("LoRA", lora_cfg, True), ("full fine-tuning", cfg, False)]
    if not cfg.model.lora_rank:
        modes.reverse()
    for i, (name, c, lora) in enumerate(modes):
        e = estimate(c, data_parallel, lora)
        what = f"LoRA r={c.model.lora_rank}" if lora else name
        tag = "this config" if i == 0 else "for comparison"
        lines.append(f"# memory per GPU ({what}, {tag}): weights {_gb(e.weights)} + gradients {_gb(e.gradients)} + "
                     f"optimizer {_gb(e.optimizer)} = {_gb(e.total)} before activations "
                     f"({e.params.trained / 1e6:.1f} M of {e.params.total / 1e6:.1f} M parameters on this GPU train)")
    lines.append("# (activations, buffer padding and the CUDA context come on top: megarank/training/memory.py)")
    return lines
