"""An MTEB (2.x) cross-encoder for a megarank export, fed the single string megarank trained on.

MTEB's own wrapper for NVIDIA's reranker (``CrossEncoderWrapper`` with ``query_prefix="question:"`` and
``passage_prefix=" \\n \\n passage:"``, mteb/models/model_implementations/nvidia_models.py) hands prefixed texts to
sentence-transformers, which on a megarank export would format them a second time through the export's chat
template. This class implements mteb's ``CrossEncoderProtocol`` (mteb/models/models_protocols.py: ``predict(inputs1,
inputs2, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs)`` over two dataloaders of batches with a
``"text"`` column, and ``mteb_model_meta``) with the export's tokenizer and model directly:

    import mteb
    from checkpoint_tools.mteb_model import MegarankReranker
    model = MegarankReranker("runs/l1b-hf")
    mteb.evaluate(model, mteb.get_tasks(tasks=["SciDocsRR"]))

Each pair is given to the export's tokenizer class as a text pair (``tokenization_megarank.py``): BOS +
``data.template``, right-padded, and a pair over the export's ``model_max_length`` (megarank's ``data.max_length``)
cut as megarank cuts it (passage first, the query only down to ``data.max_query_length``); scores are the raw
logits (no sigmoid), as megarank's evaluation ranks them.
"""
from __future__ import annotations

import numpy as np
import torch


class MegarankReranker:
    def __init__(self, model_name: str, revision: str | None = None, device: str | None = None,
                 batch_size: int = 32, **kwargs):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name, self.revision, self.batch_size = model_name, revision, batch_size
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model_name, revision=revision, trust_remote_code=True)
        self.tokenizer.padding_side = "right"
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_name, revision=revision, trust_remote_code=True, **kwargs).eval().to(self.device)

    def encode(self, pairs) -> dict:
        """input_ids / attention_mask of megarank's input for [(query, passage)]."""
        return self.tokenizer([q for q, _ in pairs], [p for _, p in pairs], padding=True, truncation=True,
                              return_tensors="pt")

    @torch.no_grad()
    def score_pairs(self, pairs) -> np.ndarray:
        """Raw relevance scores of [(query, passage)], batch_size pairs at a time."""
        out = []
        for i in range(0, len(pairs), self.batch_size):
            batch = {k: v.to(self.device) for k, v in self.encode(pairs[i:i + self.batch_size]).items()}
            out.append(self.model(**batch).logits[:, 0].float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def predict(self, inputs1, inputs2, *, task_metadata=None, hf_split=None, hf_subset=None, prompt_type=None,
                **kwargs) -> np.ndarray:
        """mteb's CrossEncoderProtocol: queries and documents come as two dataloaders batched alike."""
        scores = [self.score_pairs(list(zip(q["text"], d["text"], strict=True)))
                  for q, d in zip(inputs1, inputs2, strict=True)]
        return np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)

    @property
    def mteb_model_meta(self):
        from mteb.models.model_meta import ModelMeta

        return ModelMeta.create_empty(overwrites=dict(
            name=self.name, revision=self.revision, loader=MegarankReranker, model_type=["cross-encoder"],
            framework=["PyTorch", "Transformers"]))
