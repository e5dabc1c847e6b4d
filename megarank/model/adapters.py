"""LoRA adapters on the frozen base linears of a built reranker, and their merge into the base weights.

``add_lora(model, model_cfg)`` hangs one :class:`LoRAAdapter` beside each targeted base linear of every layer
of this pipeline stage (``self_attention.linear_qkv`` gets ``self_attention.linear_qkv_adapter``), adds its output
to the base linear's output through a forward hook, and freezes every base parameter: only the adapters, the
score head and, with ``model.lora_train_final_norm``, the final norm keep ``requires_grad``. The base
parameters keep their names and checkpoint keys, so ``checkpoint.load`` fills them as for full fine-tuning.

The adapter is ``y += (alpha / r) * B(A(dropout(x)))``, A initialised kaiming-uniform (a = sqrt(5), as PEFT and
Megatron-Bridge's ``kaiming`` option, src/megatron/bridge/peft/utils.py:790-803, 1200-1201) and B zero, so a
fresh adapter leaves the model's output unchanged. Its sharding follows the base layer, as in Megatron-Bridge's
``ParallelLinearAdapter`` (peft/utils.py:1033-1083, forward 1208-1279):

- column-parallel base (``linear_qkv``, ``linear_fc1``; weight ``[out/tp, in]``): A ``[r/tp, in]`` split on the
  rank, its output all-gathered to ``[.., r]``; B ``[out/tp, r]`` split like the base rows (``linear_fc1``'s
  ``[gate; up]`` halves each split, saved through megatron's SwiGLU factory, mlp.py:276). The input gradient
  of A is a partial sum over TP ranks, summed by the same collective as the base layer's: an all-reduce
  (``copy_to_tensor_model_parallel_region``), or under sequence parallelism the reduce-scatter of the
  all-gather that gives the adapter the base layer's gathered input (peft/utils.py:1240-1245).
- row-parallel base (``linear_proj``, ``linear_fc2``; weight ``[out, in/tp]``): A ``[r, in/tp]`` split on the
  input like the base, its partial output all-reduced (``[.., r]``: cheap); B ``[out, r]`` replicated. Under
  sequence parallelism the base output is reduce-scattered along the sequence; the adapter takes this rank's
  slice of the rank-r activation before B, so B's gradient is a partial sum over the sequence slices: B is
  marked ``sequence_parallel`` and megatron's ``finalize_model_grads`` all-reduces it over TP as it does the
  norm weights (megatron/core/distributed/finalize_model_grads.py:353-357).

Transformer Engine's fused ``LayerNormColumnParallelLinear`` normalises inside the linear: it is told to also
return the normed input (``return_layernorm_output``), which is what the adapter reads, as Megatron-Bridge does
(peft/utils.py:625-628; adapter_wrapper.py:142-197 for the return shapes). TE adds that output's gradient to its
input gradient *after* its own all-reduce / reduce-scatter (transformer_engine/pytorch/module/layernorm_linear.py
:1132-1135 at TE d0067d0), so the adapter sums its partial input gradient itself, exactly as on the local spec.
Unlike Megatron-Bridge (peft/utils.py:635-651) it does not ask TE for the sequence-gathered output
(``return_layernorm_output_gathered``): since TE commit ce0b46c4d (May 2025, "MXFP8 support in Userbuffers") TE's
backward no longer adds the gradient of that gathered output anywhere (the ``dgrad + grad_outputs[1]`` before the
reduce-scatter was removed; only the non-gathered case at :1134 remains), so the adapter's input gradient would
be dropped under sequence parallelism. The adapter all-gathers the local normed input itself instead (one extra
all-gather per adapted column linear).

Every adapter tensor is saved as a global tensor (``[L, r, in]`` for A, ``[L, out, r]`` for B under
``decoder.layers.<parent>.<target>_adapter.lora_{a,b}``), so it loads at any TP/PP like the base weights, and
``merge_lora`` folds global adapters into global base weights: ``W + (alpha / r) * B @ A``.
"""
from __future__ import annotations

import math

import torch

TARGETS = {  # target -> (parent module in a layer, how megatron splits the base linear over TP)
    "linear_qkv": ("self_attention", "column"),
    "linear_proj": ("self_attention", "row"),
    "linear_fc1": ("mlp", "column"),
    "linear_fc2": ("mlp", "row"),
}
ADAPTER_SUFFIX = "_adapter"


def adapter_name(target: str) -> str:
    return target + ADAPTER_SUFFIX


class LoRAAdapter(torch.nn.Module):
    """The low-rank update of one base linear of one layer (see the module docstring for the sharding)."""

    def __init__(self, base, kind: str, rank: int, alpha: float, dropout: float, *, swiglu: bool,
                 generator: torch.Generator):
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        super().__init__()
        self.kind, self.rank, self.scale, self.swiglu = kind, rank, alpha / rank, swiglu
        self.sequence_parallel = bool(base.config.sequence_parallel)
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        out_local, in_local = base.weight.shape
        dtype = base.config.params_dtype
        if kind == "column":
            a_global, b_local = self._kaiming(rank, in_local, generator), (out_local, rank)
            self.lora_a = torch.nn.Parameter(a_global.chunk(self.tp, dim=0)[self.tp_rank].to(dtype).contiguous())
            self.lora_b = torch.nn.Parameter(torch.zeros(b_local, dtype=dtype))
            set_tensor_model_parallel_attributes(self.lora_a, True, 0, 1)
            set_tensor_model_parallel_attributes(self.lora_b, True, 0, 1)
        else:
            a_global = self._kaiming(rank, in_local * self.tp, generator)
            self.lora_a = torch.nn.Parameter(a_global.chunk(self.tp, dim=1)[self.tp_rank].to(dtype).contiguous())
            self.lora_b = torch.nn.Parameter(torch.zeros(out_local, rank, dtype=dtype))
            set_tensor_model_parallel_attributes(self.lora_a, True, 1, 1)
            self.lora_b.sequence_parallel = self.sequence_parallel  # partial sums over sequence slices

    @staticmethod
    def _kaiming(rank: int, fan_in: int, generator: torch.Generator) -> torch.Tensor:
        """The global A, drawn whole and then split, so its value does not depend on the TP/PP layout
        (``kaiming_uniform_(a=sqrt(5))``: bound 1/sqrt(fan_in))."""
        bound = 1.0 / math.sqrt(fan_in)
        return torch.empty(rank, fan_in).uniform_(-bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: the base layer's input (column: the normed hidden states; row: this rank's ``in/tp`` slice).
        Returns what is added to the base layer's output, in its shape and split."""
        from megatron.core import tensor_parallel as tpl

        x = self.dropout(x)
        if self.kind == "column":
            if self.sequence_parallel:  # the base's gathered input; backward: reduce-scatter of the partial sums
                x = tpl.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True)
            else:  # backward: all-reduce of the partial sums
                x = tpl.copy_to_tensor_model_parallel_region(x)
            h = torch.nn.functional.linear(x, self.lora_a)
            h = tpl.copy_to_tensor_model_parallel_region(tpl.gather_from_tensor_model_parallel_region(h))
        else:
            h = tpl.reduce_from_tensor_model_parallel_region(torch.nn.functional.linear(x, self.lora_a))
            if self.sequence_parallel:
                # This rank's sequence slice, like the base output's reduce-scatter; the gradient is
                # all-gathered back (mappings.py:277-293 split/gather along dim 0).
                h = tpl.scatter_to_sequence_parallel_region(h)
        return torch.nn.functional.linear(h, self.lora_b) * self.scale

    def add_to_output(self, module, args, output):
        """Forward hook of the base linear: its ``(out, bias)`` becomes ``(out + adapter(input), bias)``. TE's
        norm+linear with ``return_layernorm_output`` returns ``((out, normed), bias)``: the adapter reads ``normed``."""
        out, bias = output[0], output[1]
        x = args[0]
        if isinstance(out, tuple):
            out, x = out
        return out + self(x.contiguous()).view_as(out), bias

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None) -> dict:
        """Global tensors ``lora_a [r, in]`` and ``lora_b [out, r]`` (layer axis prepended by the block)."""
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.utils import make_sharded_tensor_for_checkpoint, make_tp_sharded_tensor_for_checkpoint

        a_axis = 0 if self.kind == "column" else 1
        sd = {f"{prefix}lora_a": make_tp_sharded_tensor_for_checkpoint(
            self.lora_a, f"{prefix}lora_a", a_axis, prepend_offsets=sharded_offsets)}
        key = f"{prefix}lora_b"
        if self.kind == "column":
            b = make_tp_sharded_tensor_for_checkpoint(self.lora_b, key, 0, prepend_offsets=sharded_offsets)
            if self.swiglu:
                singleton = (metadata or {}).get("singleton_local_shards", False)
                b = apply_swiglu_sharded_factory(b, sharded_offsets, singleton)
        else:  # replicated over TP: megatron's default replica id makes TP rank 0's copy the saved one
            b = make_sharded_tensor_for_checkpoint(self.lora_b, key, prepend_offsets=sharded_offsets)
        sd[key] = b
        return sd



def is_trainable(key: str, train_final_norm: bool) -> bool:
    """Whether a parameter (a state-dict or checkpoint key) trains in a LoRA run: the adapters, the score head
    and, with ``model.lora_train_final_norm``, the final norm."""
    return (ADAPTER_SUFFIX + "." in key or key.startswith("score.")
            or (train_final_norm and key.startswith("decoder.final_layernorm.")))


def _generator(seed: int, layer_number: int, target: str) -> torch.Generator:
    """One generator per (seed, layer, target): A's value is the same whatever the TP/PP layout."""
    index = list(TARGETS).index(target)
    return torch.Generator().manual_seed(seed * 1_000_003 + layer_number * 16 + index)


def add_lora(model, model_cfg, seed: int | None = None) -> list:
    """Give every targeted base linear of this stage's layers an adapter (model_cfg.lora_rank, lora_alpha,
    lora_dropout, lora_targets) and freeze everything but the adapters, the score head (and the final norm with
    lora_train_final_norm). ``seed`` defaults to ``torch.initial_seed()`` (train.seed, set on every rank by
    ``parallel.init.set_seed``). Returns the adapters' module names."""
    seed = torch.initial_seed() if seed is None else seed
    names = []
    for i, layer in enumerate(model.decoder.layers):
        for target in model_cfg.lora_targets:
            parent_name, kind = TARGETS[target]
            parent = getattr(layer, parent_name)
            base = getattr(parent, target)
            if hasattr(base, "return_layernorm_output"):  # TE LayerNormColumnParallelLinear: hand out the normed
                base.return_layernorm_output = True       # input, never gathered (module docstring)
            adapter = LoRAAdapter(
                base, kind, model_cfg.lora_rank, model_cfg.lora_alpha, model_cfg.lora_dropout,
                swiglu=target == "linear_fc1" and base.config.gated_linear_unit,
                generator=_generator(seed, layer.layer_number, target))
            parent.add_module(adapter_name(target), adapter)
            base.register_forward_hook(adapter.add_to_output)
            names.append(f"decoder.layers.{i}.{parent_name}.{adapter_name(target)}")
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable(name, model_cfg.lora_train_final_norm))
    if model.pre_process and model.config.recompute_granularity is not None:
        # megatron's recompute (full layers, or selective modules such as the MLP) is an autograd.Function of its
        # input tensors (tensor_parallel/random.py CheckpointFunction): with a frozen embedding and no adapter
        # before it, that input needs no gradient, and the adapters inside would silently get none. (CUDA only:
        # not exercised by the CPU tests.)
        model.embedding.register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    return names


def merge_lora(tensors: dict, rank: int, alpha: float) -> dict:
    """Global tensors of a LoRA model (``model/`` keys: stacked ``[L, ...]`` layers) -> the same model's global
    tensors without adapters, each adapted weight replaced by ``W + (alpha / rank) * B @ A`` (computed in float64,
    then cast to W's dtype). ``linear_fc1``'s B rows are ``[gate; up]`` like W's, so the product lines up."""
    merged = {k: v for k, v in tensors.items() if ADAPTER_SUFFIX + "." not in k}
    for target, (parent, _) in TARGETS.items():
        prefix = f"decoder.layers.{parent}.{adapter_name(target)}."
        if prefix + "lora_a" not in tensors:
            continue
        a, b = tensors[prefix + "lora_a"].double(), tensors[prefix + "lora_b"].double()
        key = f"decoder.layers.{parent}.{target}.weight"
        w = tensors[key]
        merged[key] = (w.double() + (alpha / rank) * torch.matmul(b, a)).to(w.dtype)
    return merged
