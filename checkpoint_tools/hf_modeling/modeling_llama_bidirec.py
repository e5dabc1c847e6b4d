"""A bidirectional Llama cross-encoder reranker for ``transformers`` (shipped with megarank exports).

    scores = score(pool(LlamaModel_bidirectional(input_ids, attention_mask), attention_mask)) / temperature

Same network as megarank's: every token attends to every valid token (no causal mask), RoPE/RMSNorm/SwiGLU as in
Llama, pooling over valid tokens only (``avg`` = mean including BOS, ``last`` = last valid token, ``cls`` = first
token), ``Linear(hidden, num_labels, bias=False)``, divided by ``temperature`` (1.0 in megarank exports, which fold
the training temperature into ``score.weight``).

Bidirectional attention: on transformers >= 5 ``config.is_causal = False`` makes the model build a padding-only mask
for whatever attention implementation is active (eager, sdpa, flash); on 4.x (whose ``LlamaModel`` always builds a
causal mask from a 2-D mask, and whose sdpa path runs causally when it gets no mask) a 4-D additive float mask (0 for
valid keys, the dtype's minimum for padding) is always passed, all zeros when the caller gave no ``attention_mask``.
A 4-D *boolean* mask would be wrong under eager attention, which adds the mask to the scores.
"""

import torch
import transformers
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.llama.modeling_llama import LlamaModel, LlamaPreTrainedModel

from .configuration_llama_bidirec import LlamaBidirectionalConfig

# transformers >= 5 honours config.is_causal=False in its mask builder. 4.5x ship masking_utils (some even
# create_bidirectional_mask) but LlamaModel there still calls create_causal_mask, so the version decides, not an import.
_NATIVE_BIDIRECTIONAL = int(transformers.__version__.split(".")[0]) >= 5


def additive_padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[b, s] (1 = real token) -> [b, 1, s, s] float: 0 where a key is real, finfo(dtype).min where it is padding."""
    b, s = attention_mask.shape
    keys = attention_mask[:, None, None, :].to(torch.bool).expand(b, 1, s, s)
    return torch.zeros(b, 1, s, s, dtype=dtype, device=attention_mask.device).masked_fill(~keys, torch.finfo(dtype).min)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """hidden [b, s, h], attention_mask [b, s] -> [b, h] over valid tokens."""
    valid = attention_mask.to(torch.bool)
    if mode == "avg":
        mask = valid.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if mode == "last":
        if bool(valid[:, -1].all()):  # left padding (or none): the last position is real everywhere
            return hidden[:, -1]
        last = valid.long().sum(1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if mode == "cls":
        return hidden[:, 0]
    raise ValueError(f"unknown pooling {mode!r}; expected avg, last or cls")


class LlamaBidirectionalModel(LlamaModel):
    """LlamaModel with bidirectional (padding-only) attention."""

    config_class = LlamaBidirectionalConfig

    def __init__(self, config):
        config.is_causal = False
        super().__init__(config)
        for layer in self.layers:
            layer.self_attn.is_causal = False  # sdpa/flash with no mask must not fall back to causal

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        if attention_mask is None:  # no mask = every token is real (never "causal")
            ref = input_ids if input_ids is not None else inputs_embeds[..., 0]
            attention_mask = torch.ones(ref.shape[:2], dtype=torch.long, device=ref.device)
        if attention_mask.dim() == 2 and not _NATIVE_BIDIRECTIONAL:
            dtype = inputs_embeds.dtype if inputs_embeds is not None else self.embed_tokens.weight.dtype
            attention_mask = additive_padding_mask(attention_mask, dtype)
        kwargs.pop("use_cache", None)
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
            use_cache=False, **kwargs,
        )


class LlamaBidirectionalForSequenceClassification(LlamaPreTrainedModel):
    """Bidirectional Llama + pooling + linear score head: logits [b, num_labels] = relevance scores."""

    config_class = LlamaBidirectionalConfig

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = LlamaBidirectionalModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             inputs_embeds=inputs_embeds, **kwargs)
        hidden = outputs.last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        pooled = pool(hidden, attention_mask, getattr(self.config, "pooling", "avg"))
        logits = self.score(pooled.to(self.score.weight.dtype)) / getattr(self.config, "temperature", 1.0)
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = nn.functional.binary_cross_entropy_with_logits(logits.view(-1), labels.view(-1).to(logits.dtype))
            else:
                loss = nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )
