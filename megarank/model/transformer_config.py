"""Translate megarank's ModelConfig/ParallelConfig into megatron-core's TransformerConfig (Llama settings)."""
import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megarank.config import ModelConfig, ParallelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_transformer_config(model: ModelConfig, parallel: ParallelConfig, impl: str) -> TransformerConfig:
    dtype = DTYPES[model.dtype]
    on_gpu = torch.cuda.is_available()
    te = impl == "transformer_engine"
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels or model.hidden_size // model.num_attention_heads,
        # Llama: RMSNorm, SwiGLU MLP ([gate; up] in linear_fc1), no biases anywhere.
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        attention_dropout=model.attention_dropout,
        hidden_dropout=model.hidden_dropout,
        init_method_std=model.init_method_std,
        attention_softmax_in_fp32=True,
        # Parallelism.
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        pipeline_dtype=dtype,
        # Precision: parameters in the compute dtype; the optimizer keeps fp32 master weights for bf16/fp16.
        params_dtype=dtype,
        bf16=model.dtype == "bf16",
        fp16=model.dtype == "fp16",
        fp8=model.fp8,
        fp8_recipe=model.fp8_recipe,
        first_last_layers_bf16=model.fp8_first_last_bf16,
        # Kernel fusions need apex/TE (or pick CUDA-only kernels); keep them to the TE path on GPU.
        masked_softmax_fusion=te and on_gpu,
        bias_activation_fusion=False,
        bias_dropout_fusion=te and on_gpu,
        apply_rope_fusion=False,
        # "Take the MLP activation module from the layer spec": the local spec's SwiGLUActivation. Never on
        # the TE spec, whose MLP has no such module and would then apply plain SiLU to [gate; up].
        use_te_activation_func=not te,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=not on_gpu,
        recompute_granularity=model.recompute_granularity,
        recompute_method="uniform" if model.recompute_granularity == "full" else None,
        recompute_num_layers=model.recompute_num_layers if model.recompute_granularity == "full" else None,
    )
