"""Translate megarank's ModelConfig/ParallelConfig into megatron-core's TransformerConfig (Llama settings).

GPU speed settings (what Megatron-LM turns on for Llama on Hopper) are switched on here only where they can
run: the kernel fusions need Transformer Engine on CUDA, so on CPU (and with the local spec) every one of them
is off and the numerics are those of the plain code path. Each is named in ModelConfig with its reason.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megarank.config import ModelConfig, ParallelConfig



def make_transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    impl: str,
    *,
    cuda: Optional[bool] = None,
    init_weights: bool = True,
    ddp_training: bool = False,
) -> TransformerConfig:
    """The TransformerConfig of this model on this machine.

    cuda: whether the model runs on a GPU (default: torch.cuda.is_available()); tests pass True to build the
        GPU configuration on CPU.
    init_weights: False when every weight is overwritten right after building (checkpoint.load, resume):
        megatron then allocates without running the init methods (``perform_initialization``).
    ddp_training: the model will be wrapped in megatron's DistributedDataParallel for training, which gives
        every parameter the fp32 ``main_grad`` buffer that gradient-accumulation fusion writes into.
    """
    dtype = model.torch_dtype
    on_gpu = torch.cuda.is_available() if cuda is None else cuda
    te = impl == "transformer_engine"
    te_gpu = te and on_gpu
    full = model.recompute_granularity == "full"
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        # Llama: RMSNorm, SwiGLU MLP ([gate; up] in linear_fc1), no biases anywhere. The TE spec reads
        # `normalization` too (TENorm / TELayerNormColumnParallelLinear build TE's RMSNorm from it).
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        attention_dropout=model.attention_dropout,
        hidden_dropout=model.hidden_dropout,
        init_method_std=model.init_method_std,
        perform_initialization=init_weights,
        attention_softmax_in_fp32=True,
        # Parallelism.
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        # Context parallelism (megarank/parallel/context.py). TEDotProductAttention hands TE the CP group only when
        # config.context_parallel_size > 1 (extensions/transformer_engine.py:1228-1252); the layer passes
        # cp_comm_type to it (transformer_layer.py:295-299). "p2p", megatron's own default there (:1240-1241): TE's
        # ring overlaps each K/V exchange with a full block of bidirectional attention; "all_gather" exposes its
        # all-gather (and for THD needs FusedAttention or FA3), "a2a" needs heads divisible by CP.
        context_parallel_size=parallel.context_parallel_size,
        cp_comm_type="p2p" if parallel.context_parallel_size > 1 else None,
        pipeline_dtype=dtype,
        # Batches are padded per batch, so stages exchange activation shapes before each p2p transfer
        # (p2p_communication.py:301-304); the MoE-only allgather dispatcher rejects that
        # (transformer_config.py:1827-1832), so name the dispatcher that accepts it (no MoE layer is built).
        variable_seq_lengths=parallel.pipeline_model_parallel_size > 1,
        moe_token_dispatcher_type="alltoall",
        # Precision: parameters in the compute dtype; the optimizer keeps fp32 master weights for bf16/fp16.
        params_dtype=dtype,
        bf16=model.dtype == "bf16",
        fp16=model.dtype == "fp16",
        fp8=model.fp8,
        fp8_recipe=model.fp8_recipe,
        first_last_layers_bf16=model.fp8_first_last_bf16,
        # Kernel fusions need apex/TE (or pick CUDA-only kernels); keep them to the TE path on GPU.
        masked_softmax_fusion=te_gpu,
        bias_dropout_fusion=te_gpu,
        # megatron's fused SwiGLU (bias_swiglu_impl, mlp.py:204) on the TE spec, whose MLP applies the gated
        # activation itself. Never together with use_te_activation_func (transformer_config.py:1511-1516 raises).
        bias_activation_fusion=te_gpu and model.bias_swiglu_fusion,
        # TE's fused RoPE kernel (rope_utils.py:286); without TE megatron raises at build
        # (transformer_config.py:1549-1552), so only on the TE path.
        apply_rope_fusion=te_gpu and model.apply_rope_fusion,
        # "Take the MLP activation module from the layer spec": the local spec's SwiGLUActivation. Never on
        # the TE spec, whose MLP has no such module and would then apply plain SiLU to [gate; up].
        use_te_activation_func=not te,
        persist_layer_norm=False,
        # TE's GEMMs accumulate weight gradients straight into DDP's fp32 main_grad (fuse_wgrad_accumulation,
        # extensions/transformer_engine.py:626/828): no separate bf16 .grad and add per micro-batch. Needs
        # the main_grad buffers, i.e. DDP; the local layers would need apex's fused_weight_gradient_mlp_cuda.
        gradient_accumulation_fusion=te_gpu and ddp_training and model.gradient_accumulation_fusion,
        use_cpu_initialization=not on_gpu,
        recompute_granularity=model.recompute_granularity,
        recompute_method="uniform" if full else None,
        recompute_num_layers=model.recompute_num_layers if full else None,
        # Selective recompute recomputes these submodules (transformer_config.py:1193-1211); megatron's
        # default is ["core_attn"].
        recompute_modules=list(model.recompute_modules),
    )
