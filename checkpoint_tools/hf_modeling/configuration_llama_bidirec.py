"""Configuration of a bidirectional Llama reranker (NVIDIA's ``llama_bidirec`` format), shipped with megarank exports.

``LlamaConfig`` plus the reranker head settings: ``pooling`` (avg | last | cls over valid tokens) and
``temperature`` (scores are divided by it). Attention is bidirectional: ``is_causal = False``.
"""
import dataclasses

from transformers.models.llama.configuration_llama import LlamaConfig

if dataclasses.is_dataclass(LlamaConfig):  # transformers >= 5: configs are dataclasses

    class LlamaBidirectionalConfig(LlamaConfig):
        model_type = "llama_bidirec"
        # Declared fields: transformers 5 would otherwise take `temperature` for a misplaced generation setting.
        pooling: str = "avg"
        temperature: float = 1.0

        def __post_init__(self, **kwargs):
            super().__post_init__(**kwargs)
            # the mask builders then make a padding-only (bidirectional) mask for every attention implementation
            self.is_causal = False

else:  # pragma: no cover - transformers 4.x

    class LlamaBidirectionalConfig(LlamaConfig):
        model_type = "llama_bidirec"

        def __init__(self, pooling: str = "avg", temperature: float = 1.0, **kwargs):
            self.pooling = pooling
            self.temperature = temperature
            super().__init__(**kwargs)
            self.is_causal = False
