"""The reranker model: ``build_model(cfg)`` gives this pipeline stage's part of it."""
from megarank.model.reranker import LlamaReranker

__all__ = ["LlamaReranker", "build_model"]


def build_model(model_cfg, parallel_cfg, *, init_weights: bool = True, ddp_training: bool = False) -> LlamaReranker:
    """Build this rank's stage of the reranker (parallel state must be initialised).

    init_weights: False when every weight is loaded right after (``checkpoint.load`` or a resume): the
        transformer layers are then allocated without their random initialisation (megatron's
        ``perform_initialization=False``), which for 8B is minutes of RNG work thrown away. Only for callers
        that load strictly (checkpoint.load_model_weights / load_training_checkpoint): the values are
        uninitialised memory until then.
    ddp_training: the model is about to be wrapped by ``training.optimizer.wrap_ddp`` for training; lets TE
        accumulate weight gradients into DDP's main_grad (``model.gradient_accumulation_fusion``). A model run
        backward without DDP must keep this False.
    """
    import logging

    import torch
    from megatron.core import parallel_state

    from megarank.parallel.init import cuda_max_connections_problem
    from megarank.model.spec import block_spec, resolve_impl
    from megarank.model.transformer_config import make_transformer_config

    impl = resolve_impl(model_cfg.transformer_impl)
    config = make_transformer_config(model_cfg, parallel_cfg, impl, init_weights=init_weights, ddp_training=ddp_training)
    if torch.cuda.is_available():
        problem = cuda_max_connections_problem(parallel_cfg.tensor_model_parallel_size)
        if problem:
            logging.getLogger(__name__).warning(problem)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    model = LlamaReranker(
        config,
        block_spec(config, impl, model_cfg.attention_backend, pp_rank=pp_rank),
        padded_vocab_size=model_cfg.padded_vocab(parallel_cfg.tensor_model_parallel_size),
        rope_theta=model_cfg.rope_theta,
        rope_scaling=model_cfg.rope_scaling,
        pooling=model_cfg.pooling,
        temperature=model_cfg.temperature,
        num_labels=model_cfg.num_labels,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        max_sequence_length=model_cfg.max_position_embeddings,
    )
    if not init_weights:
        _mark_tensor_parallel_weights(model)
    if model_cfg.lora_rank > 0:
        from megarank.model.adapters import add_lora

        add_lora(model, model_cfg)  # adapters on the frozen base linears; only adapters and head train
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def _mark_tensor_parallel_weights(model) -> None:
    """With ``perform_initialization=False`` megatron's parallel layers skip ``_initialize_affine_weight_cpu/gpu``,
    and with them ``set_tensor_model_parallel_attributes`` (megatron/core/tensor_parallel/layers.py:244-266,
    855-885, 1178-1206). Without ``tensor_model_parallel`` a TP shard counts as a TP duplicate: the grad norm then
    leaves out every TP>0 rank's shards (measured: TP=2 norm 0.538 vs 0.605), so clipping goes wrong. Set them
    as the init would: embedding and column-parallel weights split on dim 0, row-parallel on dim 1."""
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None or getattr(weight, "tensor_model_parallel", False):
            continue
        if isinstance(module, (VocabParallelEmbedding, ColumnParallelLinear)):
            set_tensor_model_parallel_attributes(weight, True, 0, 1)
        elif isinstance(module, RowParallelLinear):
            set_tensor_model_parallel_attributes(weight, True, 1, 1)
