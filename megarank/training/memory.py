"""Per-GPU memory of training, from the config alone (``megarank launch --dry-run``): the weights, the gradient
buffer, the optimizer state and the activations of the fullest pipeline stage, for full fine-tuning and for LoRA,
plus a fixed allowance for what the CUDA runtime takes. No torch here: it runs on a login node.

Parameters and optimizer state, per GPU (one rank of the fullest pipeline stage: the first holds the embedding,
the last the final norm and head; each holds num_layers / PP layers):

- weights: every parameter of the stage at its TP split (embedding rows, the column-parallel linears' rows and the
  row-parallel ones' columns divided by TP; norms and the score head whole) in ``model.dtype``; LoRA adapters add
  their A and B (model/adapters.py: column base A ``[r/tp, in]``, B ``[out/tp, r]``; row base A ``[r, in/tp]``,
  B ``[out, r]``);
- gradients: megatron DDP's buffer, fp32 (``grad_reduce_in_fp32``, training/optimizer.py), one value per parameter
  that trains (all of them, or the adapters + head with LoRA: DDP buckets only those,
  distributed_data_parallel.py:112);
- optimizer: Adam's two fp32 moments, plus an fp32 master copy when ``model.dtype`` is not fp32, per trained
  parameter, divided over the data-parallel ranks with the distributed optimizer (ZeRO-1). Context-parallel ranks
  hold the same parameters, so megatron's DDP and distributed optimizer run over the data-parallel group *with*
  context parallelism: the state is divided by DP x CP.

Activations: what one rank stores for backward, derived from Korthikanti et al., "Reducing Activation
Recomputation in Large Transformer Models" (2022), section 4.1. Their GPT layer stores, with s tokens per sequence,
b sequences, hidden h, a heads and 2-byte activations, sbh(34 + 5as/h) bytes: attention 11sbh + 5as^2b (QKV input
2sbh, Q and K 4sbh, softmax output 2as^2b, its dropout mask as^2b and output 2as^2b, V 2sbh, output-projection
input 2sbh, dropout mask sbh), MLP 19sbh (input 2sbh, GeLU input 8sbh, GeLU output 8sbh, dropout mask sbh) and
two LayerNorm inputs 4sbh. With tensor parallelism t it is sbh(10 + 24/t + 5as/(ht)) (the LayerNorm and dropout
terms and the inputs of the QKV and fc1 linears, 10sbh, are replicated on every TP rank), with sequence
parallelism sbh/t (34 + 5as/h) (those are split along the sequence too), and selective recomputation of the
attention core removes the 5as^2b term.

Adapted to a bidirectional Llama layer, per token of the micro-batch on this rank (T = s x b tokens, packed or
padded: ``micro_batch_tokens`` below), d = bytes of ``model.dtype``, hidden h, a query heads and g key/value
groups of head size e (a x e = h for Llama), SwiGLU width f, no dropout (Llama's default; masks are added when
``hidden_dropout`` / ``attention_dropout`` are set) and no biases:

==================  =======================  ==================================================================
term                elements per token       what stores it
==================  =======================  ==================================================================
attn_norm_in        h                        input RMSNorm's input (the residual stream), kept for its backward
qkv_in              h                        the normed input, kept by the QKV linear for its weight gradient
qkv_out             (a + 2g) e / t           the QKV output: V is a view of it, so the attention kernel keeping
                                             V keeps the whole buffer (measured on CPU, see below)
q_k_rope            (a + g) e / t            q and k after RoPE, kept by the attention kernel
attn_out            a e / t                  the attention output = the output projection's input (one tensor)
softmax_lse         a / t (fp32)             flash attention's log-sum-exp per head and token
mlp_norm_in         h                        pre-MLP RMSNorm's input (the residual stream after attention)
fc1_in              h                        the normed input, kept by fc1 (gate and up, fused) for its weights
fc1_out             2f / t                   fc1's output [gate; up], kept by SwiGLU for its backward
fc2_in              f / t                    silu(gate) x up, kept by fc2 for its weight gradient
==================  =======================  ==================================================================

``/ t`` terms are split over the TP ranks (column-parallel outputs); the four h-wide terms are replicated over TP
without sequence parallelism and split with it (Korthikanti's 10sbh). In Korthikanti's notation, at d = 2 and GQA
off (g = a, a e = h) this is sbh(8 + 2(6h + 3f)/(ht)) + 4asb/t bytes: with f = 4h, sbh(8 + 36/t) against a GPT
layer's sbh(10 + 24/t). The h-wide 8 lacks GPT's two dropout masks; of the 36, SwiGLU's 2f + f is 24 (GeLU's input
and output: 16), the QKV output that V keeps alive 6 and the rotated q and k 4 (GPT's Q, K and V: 6), the attention
output 2 (GPT's output-projection input: 2). The residual adds store nothing and RoPE's cos/sin tables are per
position, not per token. Llama 3.2 1B (h 2048,
a 32, g 8, e 64, f 8192) stores 40,448 elements = 80,896 bytes per token per layer in bf16 (+128 bytes of
log-sum-exp).

The attention kernel decides the s^2 term. Transformer Engine's flash / fused attention (the GPU path; the
estimate assumes it for ``transformer_impl`` auto and transformer_engine) and torch SDPA (the local spec's
``attention_backend: sdpa``: on CPU its flash kernel takes the padding mask, on CUDA the flash / memory-efficient
ones) keep no score matrix: the a/t log-sum-exp per token instead. megatron-core's DotProductAttention
(``attention_backend: megatron``) keeps the fp32 softmax output (``attention_softmax_in_fp32``; 4 bytes) and, below
fp32, its d-byte copy for the product with V, a/t x L values per token with L the longest sequence
(``data.max_length``: a padded batch is b x s^2 = T x s, a packed stream sum(L_i^2) <= T x L); attention dropout
adds a 1-byte mask and a d-byte output there.

The local spec (CPU; ``transformer_impl: local``) stores more than TE's fused kernels, as counted by walking the
autograd graph of a built model (tests/test_memory.py, benchmarks/memory_bench.py): its RMSNorm
computes in fp32 (the inputs are kept at 4 bytes) and keeps the normalised value for the weight's gradient when the
norms train (h more per norm; not with LoRA, whose norms are frozen), and its SwiGLU keeps silu(gate) beside its
input (f / t more). With CP on the local spec, the all-gathered keys and values are kept by SDPA: 2 g e / t per
token of the whole sequence, (CP - 1) x 2ge/t more per local token.

Parallelism and schedule:

- context parallelism: every sequence is split over CP ranks, so each rank has T / CP tokens and every term above
  is per local token (Transformer Engine's ring attention passes K/V chunks and keeps only the local ones);
- pipeline parallelism: a stage holds num_layers / PP layers; with 1F1B the first stage has min(PP, number of
  micro-batches) micro-batches in flight, the last one (where the final norm and head are) one;
- recomputation: ``selective`` with ``core_attn`` drops softmax_lse (and the s^2 terms); with ``mlp`` the MLP keeps
  only its input (TE: the norm's input, as its RMSNorm is fused into fc1; local: fc1_in); with ``layernorm``
  (local only) the norms' outputs are recomputed (qkv_in, fc1_in and the normalised copies go). ``full`` keeps
  each chunk of ``recompute_num_layers`` layers' input only (h, split over TP with SP) and rebuilds one chunk at a
  time during backward;
- outside the layers: the final RMSNorm's input (h per token; + the normalised copy on the local spec) and the
  token ids (8 bytes); there is no vocabulary-wide output: the head is ``[h, num_labels]`` on pooled states;
- backward working set: while a layer runs backward it holds the gradients of its activations, counted as one
  more layer's activations (plus, with full recompute, the rebuilt chunk).

LoRA changes the weights, gradients and optimizer state, not the activations on the TE path (the adapters keep the
same inputs the base linears kept, and their r-wide intermediates, under 0.1%, are not counted).

Not counted: buffer padding to bucket sizes and temporaries outside backward (the optimizer step's). The CUDA
context, NCCL's buffers, cuBLAS / Transformer Engine workspaces and the caching allocator's fragmentation are one
fixed allowance (``RUNTIME_ALLOWANCE``, 4 GB), a guess stated as such, not a measurement.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# CUDA context (~0.5-1 GB), NCCL buffers, cuBLAS / TE workspaces and allocator fragmentation: a fixed guess.
RUNTIME_ALLOWANCE = 4 * 10**9
DEFAULT_GPU_MEMORY_GB = 80.0  # H100 80GB (its 85.5e9 bytes leave the rest as margin)


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


# ----------------------------------------------------------------------------------------------- activations


def _round_up(n: int, multiple: int) -> int:
    return -(-n // max(multiple, 1)) * max(multiple, 1)


def assumed_impl(m) -> str:
    """The layer implementation the estimate is for: ``auto`` is Transformer Engine (the GPU run the estimate is
    made for, in the NGC container), ``local`` the local spec."""
    return "local" if m.transformer_impl == "local" else "transformer_engine"


def micro_batch_tokens(cfg) -> int:
    """Tokens of one micro-batch (all CP ranks together): the ``train.micro_batch_tokens`` budget (at least one
    whole query group, which forms a micro-batch alone when it is over the budget), else
    ``micro_batch_size`` groups x ``n_passages`` sequences of ``data.max_length`` (the longest case; rounded up
    to the batch multiple: ``pad_to_multiple_of`` x TP packed, x 2CP with CP)."""
    d, t, p = cfg.data, cfg.train, cfg.parallel
    cp = max(getattr(p, "context_parallel_size", 1), 1)
    multiple = max(d.pad_to_multiple_of, 1)
    if d.packing and p.sequence_parallel:
        multiple *= p.tensor_model_parallel_size
    if cp > 1:
        multiple = _round_up(multiple, 2 * cp)
    seq = _round_up(d.max_length, multiple)
    group = d.n_passages * seq
    if t.micro_batch_tokens > 0:
        return max(t.micro_batch_tokens, group)
    return t.micro_batch_size * group


def num_micro_batches(cfg, data_parallel: int) -> int:
    """Micro-batches per step on one data-parallel rank (with a token budget: the least there can be)."""
    d, t = cfg.data, cfg.train
    groups = max(t.global_batch_size // max(data_parallel, 1), 1)
    if t.micro_batch_tokens > 0:
        return max(-(-groups * d.n_passages * d.max_length // t.micro_batch_tokens), 1)
    return max(groups // max(t.micro_batch_size, 1), 1)


def layer_terms(cfg, lora: bool = False) -> dict:
    """Bytes one layer stores per token on this rank (local tokens), term by term as in the module docstring,
    after TP / SP and recomputation (selective; ``full`` is applied in :func:`activations`)."""
    m, p = cfg.model, cfg.parallel
    tp, sp = p.tensor_model_parallel_size, p.sequence_parallel
    cp = max(getattr(p, "context_parallel_size", 1), 1)
    h, f, e = m.hidden_size, m.ffn_hidden_size, m.head_dim
    a, g = m.num_attention_heads, m.num_query_groups
    d = DTYPE_BYTES[m.dtype]
    local = assumed_impl(m) == "local"
    hw = 1 / tp if sp else 1.0  # h-wide terms: split along the sequence with SP, replicated without
    norm_in = 4 if local else d  # the local RMSNorm computes in fp32
    terms = {
        "attn_norm_in": h * norm_in * hw,
        "qkv_in": h * d * hw,
        "qkv_out": (a + 2 * g) * e * d / tp,
        "q_k_rope": (a + g) * e * d / tp,
        "attn_out": a * e * d / tp,
        "mlp_norm_in": h * norm_in * hw,
        "fc1_in": h * d * hw,
        "fc1_out": 2 * f * d / tp,
        "fc2_in": f * d / tp,
    }
    flash = not (local and m.attention_backend == "megatron")
    if flash:
        terms["softmax_lse"] = a * 4 / tp
    else:
        per_value = 4 + (d if d != 4 else 0) + ((1 + d) if m.attention_dropout > 0 else 0)
        terms["probs"] = a * cfg.data.max_length * per_value / tp
    if local:
        if not lora:
            terms["norm_normed"] = 2 * h * d * hw  # the normalised copies, for the norm weights' gradient
        terms["swiglu_act"] = f * d / tp
        if cp > 1:
            terms["kv_gathered"] = (cp - 1) * 2 * g * e * d / tp
    if m.hidden_dropout > 0:
        terms["dropout_masks"] = 2 * h * hw
    if m.recompute_granularity == "selective":
        drop = set()
        if "core_attn" in m.recompute_modules:
            drop |= {"softmax_lse", "probs"}
        if "mlp" in m.recompute_modules:
            drop |= {"fc1_out", "fc2_in", "swiglu_act"} | (set() if local else {"fc1_in"})
        if "layernorm" in m.recompute_modules and local:
            drop |= {"qkv_in", "fc1_in", "norm_normed"}
        terms = {k: v for k, v in terms.items() if k not in drop}
    return terms


@dataclass(frozen=True)
class Activations:
    """Activation bytes on the fullest rank: ``stored`` (what forward leaves for backward, every layer and
    micro-batch in flight), ``working`` (backward's working set) and the micro-batch's shape."""

    tokens: int            # tokens per micro-batch on this rank (after the CP split)
    per_layer: int         # bytes one layer stores for one micro-batch (no full recompute)
    layers: int            # layers on the stage
    in_flight: int         # micro-batches whose activations the stage holds at once
    stored: int
    working: int

    @property
    def total(self) -> int:
        return self.stored + self.working


def activations(cfg, data_parallel: int = 1, lora: bool = False) -> Activations:
    m, p = cfg.model, cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    cp = max(getattr(p, "context_parallel_size", 1), 1)
    sp = p.sequence_parallel
    tokens = -(-micro_batch_tokens(cfg) // cp)
    per_layer = round(sum(layer_terms(cfg, lora).values()) * tokens)
    d = DTYPE_BYTES[m.dtype]
    hw = 1 / tp if sp else 1.0
    layers = m.num_layers // pp
    if m.recompute_granularity == "full":
        chunk = max(min(m.recompute_num_layers, layers), 1)
        kept = -(-layers // chunk) * round(m.hidden_size * d * hw * tokens)  # each chunk's input
        rebuilt = chunk * per_layer
    else:
        kept, rebuilt = layers * per_layer, 0
    local = assumed_impl(m) == "local"
    final = round(tokens * m.hidden_size * hw * ((4 + (0 if lora else d)) if local else d))
    ids = 8 * tokens
    in_flight = min(pp, num_micro_batches(cfg, data_parallel)) if pp > 1 else 1
    if pp == 1:
        stored = kept + final + ids
    else:
        stored = max(in_flight * (kept + ids), kept + final)
    return Activations(tokens, per_layer, layers, in_flight, stored, rebuilt + per_layer)


# ----------------------------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    params: StageParams
    activations: int = 0
    allowance: int = 0

    @property
    def states(self) -> int:
        """Weights + gradients + optimizer state (what the estimate held before activations were added)."""
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.states + self.activations + self.allowance


def estimate(cfg, data_parallel: int, lora: bool, allowance: int = RUNTIME_ALLOWANCE) -> MemoryEstimate:
    """Per-GPU bytes at data-parallel size ``data_parallel`` (world / (TP x PP x CP))."""
    m, p = cfg.model, cfg.parallel
    cp = max(getattr(p, "context_parallel_size", 1), 1)
    params = stage_params(m, p.tensor_model_parallel_size, p.pipeline_model_parallel_size, lora)
    state = 8 + (4 if m.dtype != "fp32" else 0)
    optimizer = params.trained * state
    if p.use_distributed_optimizer:
        optimizer = -(-optimizer // (data_parallel * cp))
    act = activations(cfg, data_parallel, lora)
    return MemoryEstimate(params.total * DTYPE_BYTES[m.dtype], params.trained * 4, optimizer, params, act.total,
                          allowance)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f}"


def _recompute(m) -> str:
    if m.recompute_granularity == "full":
        return f"full recompute ({m.recompute_num_layers} layer(s) per chunk)"
    if m.recompute_granularity == "selective":
        return f"selective recompute ({', '.join(m.recompute_modules)})"
    return "no recompute"


def report(cfg, data_parallel: int, gpu_memory_gb: Optional[float] = None) -> list:
    """Dry-run lines: one table, per GPU, for this config's mode first, then the other one (full fine-tuning vs
    LoRA at rank ``model.lora_rank``, or at 16 when LoRA is off), and whether each fits ``gpu_memory_gb``."""
    import dataclasses

    gpu = DEFAULT_GPU_MEMORY_GB if gpu_memory_gb is None else gpu_memory_gb
    m, p = cfg.model, cfg.parallel
    cp = max(getattr(p, "context_parallel_size", 1), 1)
    lora_cfg = cfg if m.lora_rank else dataclasses.replace(cfg, model=dataclasses.replace(m, lora_rank=16))
    modes = [(f"LoRA r={lora_cfg.model.lora_rank}", lora_cfg, True), ("full fine-tuning", cfg, False)]
    if not m.lora_rank:
        modes.reverse()
    act = activations(cfg, data_parallel, bool(m.lora_rank))
    split = f" ({act.tokens} per CP rank)" if cp > 1 else ""
    attention = ("flash/fused attention (Transformer Engine)" if assumed_impl(m) == "transformer_engine" else
                 "local spec, " + ("SDPA" if m.attention_backend == "sdpa" else "megatron attention (s^2 kept)"))
    lines = [f"# memory per GPU, estimated (GB; megarank/training/memory.py): micro-batch {micro_batch_tokens(cfg)} "
             f"tokens{split}, {m.dtype}, {attention}, {_recompute(m)}"
             + (f", {act.in_flight} micro-batches in flight on the first stage" if act.in_flight > 1 else ""),
             f"#   {'':<22}{'weights':>8}{'grads':>8}{'optim':>8}{'activ':>8}{'runtime':>8}{'total':>8}   "
             f"fits {gpu:g} GB?"]
    for i, (name, c, lora) in enumerate(modes):
        e = estimate(c, data_parallel, lora)
        fits = "yes" if e.total <= gpu * 1e9 else "NO"
        tag = " (this config)" if i == 0 else ""
        lines.append(f"#   {name:<22}{_gb(e.weights):>8}{_gb(e.gradients):>8}{_gb(e.optimizer):>8}"
                     f"{_gb(e.activations):>8}{_gb(e.allowance):>8}{_gb(e.total):>8}   {fits}{tag}")
    lines.append(f"#   (activ = stored activations + one layer's backward working set; runtime = a fixed "
                 f"{RUNTIME_ALLOWANCE / 1e9:g} GB for the CUDA context, NCCL, workspaces and fragmentation)")
    return lines
