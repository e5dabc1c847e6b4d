"""Configuration of a bidirectional Llama reranker (NVIDIA's ``llama_bidirec`` format), shipped with megarank exports.

``LlamaConfig`` plus the reranker head settings: ``pooling`` (avg | last | cls over valid tokens) and
``temperature`` (scores are divided by it). Attention is bidirectional: ``is_causal = False``.

megarank exports fold their training temperature into ``score.weight`` and write ``temperature: 1.0`` (the value
they folded is kept as ``megarank_folded_temperature``, for information and for re-import), because vLLM and other
tools never divide by ``temperature``.
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

else:  # transformers 4.x

    class LlamaBidirectionalConfig(LlamaConfig):
        model_type = "llama_bidirec"

        def __init__(self, pooling: str = "avg", temperature: float = 1.0, **kwargs):
            kwargs.pop("is_causal", None)
            super().__init__(**kwargs)
            # Set after super(): transformers 4.x PretrainedConfig.__init__ resets `temperature` (a generation
            # default) to 1.0 when it was assigned before the call.
            self.pooling = pooling
            self.temperature = temperature
            self.is_causal = False
