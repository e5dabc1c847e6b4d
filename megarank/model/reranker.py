"""The bidirectional Llama cross-encoder reranker as a megatron-core module.

    input_ids [b, s] -> word embeddings -> TransformerBlock (bidirectional, RoPE) -> final RMSNorm
                     -> pooling over valid tokens -> Linear(hidden, num_labels, bias=False) -> / temperature

No parallel code lives here beyond what megatron-core's layers do themselves: ``pre_process`` / ``post_process``
select the first/last pipeline-stage parts, and the score head is an ordinary (TP-replicated) Linear. Under context
parallelism (megarank/parallel/context.py) each rank pools its share of every sequence, applies the head to it and
the partial scores are summed over the CP ranks.
"""
from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock

from megarank.config import RopeScalingConfig
from megarank.model.attention import RotaryTables, SDPACoreAttention
from megarank.model.pooling import pool, pool_packed
from megarank.parallel import context
from megarank.parallel.context import PaddedShard


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous.

    Pooling reads the [s, b, h] states through a [b, s, h] transpose, so autograd hands the layers a gradient
    in [b, s, h] memory order. Left alone, that layout travels down the whole residual stream: every linear's
    backward copies it (``grad_output.contiguous()`` in megatron's wgrad) and every elementwise op runs on a
    permuted tensor. One copy here keeps all of them contiguous (about 1% of a CPU training step).
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def contiguous_grad(x: torch.Tensor) -> torch.Tensor:
    return _ContiguousGrad.apply(x)


class LlamaReranker(MegatronModule):
    def __init__(
        self,
        config,
        block_spec,
        padded_vocab_size: int,
        rope_theta: float,
        rope_scaling: Optional[RopeScalingConfig],
        pooling: str = "avg",
        temperature: float = 1.0,
        num_labels: int = 1,
        pre_process: bool = True,
        post_process: bool = True,
        max_sequence_length: int = 131072,
    ):
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder  # what megatron's pipeline schedule expects
        self.pre_process, self.post_process = pre_process, post_process
        # A reranker has no LM head to tie to the embedding (read by megatron's finalize_model_grads).
        self.share_embeddings_and_output_weights = False
        self.pooling, self.temperature = pooling, temperature
        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config, vocab_size=padded_vocab_size, max_sequence_length=max_sequence_length, position_embedding_type="rope"
            )
        self.rotary_pos_emb = RotaryEmbedding(
            kv_channels=config.kv_channels,
            rotary_percent=1.0,
            rotary_interleaved=False,  # Llama: rotate-half
            rotary_base=rope_theta,
            use_cpu_initialization=True,
        )
        if rope_scaling is not None:
            # Pass every Llama-3 scaling parameter explicitly; megatron's own flag only takes `factor`.
            self.rotary_pos_emb.inv_freq = self.rotary_pos_emb._apply_scaling(
                self.rotary_pos_emb.inv_freq,
                factor=rope_scaling.factor,
                low_freq_factor=rope_scaling.low_freq_factor,
                high_freq_factor=rope_scaling.high_freq_factor,
                original_max_position_embeddings=rope_scaling.original_max_position_embeddings,
            )
        self.decoder = TransformerBlock(config, block_spec, pre_process=pre_process, post_process=post_process)
        if post_process:
            self.score = torch.nn.Linear(config.hidden_size, num_labels, bias=False, dtype=config.params_dtype)
            torch.nn.init.normal_(self.score.weight, mean=0.0, std=config.init_method_std)
        self.core_rope = False
        self.use_core_rope(True)

    def use_core_rope(self, enabled: bool) -> bool:
        """Apply RoPE inside the local spec's SDPA core attention (one cos/sin table per model, no per-layer
        cat/neg copies; model/attention.py) instead of in megatron's attention. Same numbers either way.

        Only where every layer's core attention is ``SDPACoreAttention`` and the RoPE is the plain one megatron
        would apply with ``_apply_rotary_pos_emb_bshd`` / ``_thd`` (rotate-half, no interpolation, mscale 1
        (``_yarn_get_concentration_factor_from_config`` is 1.0 without YaRN, yarn_rotary_pos_embedding.py:274-281),
        no fused kernel, no layer without RoPE). Returns whether it is on.
        """
        cores = [layer.self_attention.core_attention for layer in self.decoder.layers]
        c = self.config
        possible = (
            all(isinstance(core, SDPACoreAttention) for core in cores)
            and not c.rotary_interleaved
            and not c.apply_rope_fusion
            and not c.multi_latent_attention
            and not getattr(c, "flash_decode", False)
            and getattr(c, "no_rope_freq", None) is None
            and not hasattr(c, "yarn_rotary_scaling_factor")
            and self.rotary_pos_emb.seq_len_interpolation_factor is None
        )
        self.core_rope = bool(enabled and possible)
        tables = RotaryTables(self.rotary_pos_emb) if self.core_rope else None
        for core in cores:
            if isinstance(core, SDPACoreAttention):
                core.rope = tables
        return self.core_rope

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline stages > 0 receive their input from the previous stage (the schedule passes a list)."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, packed_seq_params=None) -> torch.Tensor:
        """input_ids [b, s], attention_mask [b, s] bool (True = real token).

        Packed (``packed_seq_params``, a megarank.model.inputs.PackedSequences): input_ids [1, t] is one stream
        of whole sequences; attention_mask is not used by the layers (attention stays inside each segment).

        Returns scores [b (or num_sequences), num_labels] on the last pipeline stage, else hidden states
        [s, b, h] ([t, 1, h] packed) for the next.
        """
        hidden = self.embedding(input_ids=input_ids, position_ids=None) if self.pre_process else None
        if isinstance(packed_seq_params, PaddedShard):
            # A padded batch split over CP ranks (local spec only, config.validate): the mask covers the whole
            # sequence, in the order the core attention all-gathers the keys.
            padding = ~attention_mask[:, packed_seq_params.key_order][:, None, None, :]
            hidden = self.decoder(hidden_states=hidden, attention_mask=padding, rotary_pos_emb=None,
                                  packed_seq_params=packed_seq_params)
        elif packed_seq_params is not None:
            # A table max_seqlen long: the THD RoPE gives every segment positions 0..len-1
            # (rope_utils.py:178-247); packed_seq=True keeps it whole under context parallelism
            # (rotary_pos_embedding.py:177-205).
            rotary = None if self.core_rope else self.rotary_pos_emb(packed_seq_params.max_seqlen_q, packed_seq=True)
            hidden = self.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rotary,
                                  packed_seq_params=packed_seq_params)
        else:
            padding = ~attention_mask[:, None, None, :]  # [b, 1, 1, s], True = masked out (megatron convention)
            rotary = None if self.core_rope else self.rotary_pos_emb(attention_mask.shape[1])
            hidden = self.decoder(hidden_states=hidden, attention_mask=padding, rotary_pos_emb=rotary)
        if not self.post_process:
            return hidden
        return self.score_hidden(hidden, attention_mask, packed_seq_params)

    def score_hidden(self, hidden: torch.Tensor, attention_mask: torch.Tensor, packed_seq_params=None) -> torch.Tensor:
        """Final-norm states [s(/tp), b, h] -> scores [b, num_labels] (packed: [num_sequences, num_labels])."""
        if self.config.sequence_parallel:
            # Every TP rank needs the whole sequence to pool; the head is replicated, so the backward only
            # takes this rank's slice of the (identical) gradient: no reduce-scatter.
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        if isinstance(packed_seq_params, PaddedShard) or getattr(packed_seq_params, "shard", None) is not None:
            return self._score_context_parallel(hidden, attention_mask, packed_seq_params)
        if packed_seq_params is not None:
            p = packed_seq_params
            pooled = pool_packed(hidden[:, 0], p.seqlens, p.num_sequences, self.pooling)
        else:
            pooled = pool(contiguous_grad(hidden).transpose(0, 1), attention_mask, self.pooling)
        return self.score(pooled.to(self.score.weight.dtype)) / self.temperature

    def _score_context_parallel(self, hidden: torch.Tensor, attention_mask: torch.Tensor, params) -> torch.Tensor:
        """This CP rank's share of every sequence -> the scores, the same on every CP rank: pooled part (weights
        of megarank/parallel/context.py ``pooling_weights``), the head on it, the sum over CP ranks."""
        if isinstance(params, PaddedShard):
            positions, group = params.positions.to(hidden.device), params.context_group
            lengths = attention_mask.sum(1)  # right padding: the real tokens are positions 0..L-1
            weights = context.pooling_weights(positions[None, :], lengths[:, None], self.pooling).to(hidden.dtype)  # [b, s/CP]
            part = torch.einsum("bs,sbh->bh", weights, contiguous_grad(hidden))
        else:
            shard, n = params.shard, params.num_sequences
            real = sum(params.seqlens[:n])  # the local tokens of the real sequences (the end padding follows)
            segment = torch.repeat_interleave(torch.arange(n, device=hidden.device),
                                              torch.tensor(params.seqlens[:n], device=hidden.device))
            lengths = torch.tensor(shard.lengths[:n], device=hidden.device)[segment]
            weights = context.pooling_weights(shard.positions[:real].to(hidden.device), lengths, self.pooling)
            part = hidden.new_zeros(n, hidden.shape[-1]).index_add(0, segment, hidden[:real, 0] * weights.to(hidden.dtype)[:, None])
            group = shard.context_group
        scores = context.reduce_scores(self.score(part.to(self.score.weight.dtype)), group)
        return scores / self.temperature
