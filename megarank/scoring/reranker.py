"""``Reranker``: a megarank model ready to score, from a checkpoint folder, a run folder, a Hugging Face folder,
a config (random weights) or a model already in memory (the training loop's).

    from megarank import Reranker

    reranker = Reranker.from_checkpoint("runs/quickstart/train")      # the run's `latest` step
    scores = reranker.score([("what is megarank?", "megarank trains rerankers.")])   # tensor [1], fp32 logits
    ranked = reranker.rerank("what is megarank?", passages, top_k=10)               # [Ranked(index, score), ...]
    result = reranker.evaluate_beir("data/scifact", "test", top_k=100)               # metrics, first stage, scores

``from_checkpoint`` is what ``megarank evaluate`` / ``megarank rerank`` run (megarank/cli/evaluate.py wraps it):
resolve the folder, take its config with the dotted overrides applied (the layout — TP/PP, DP = world / (TP x PP)
— and data settings; the model section is the checkpoint's), start torch.distributed when nobody has (one
in-process rank without torchrun; torchrun's world under it), resolve the dtype (``--dtype auto``:
``megarank.hardware.resolve_inference_dtype``), validate, build the model at that layout and load its weights.
Every rank must make the same calls with the same arguments (scoring is collective); every rank gets every score.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import torch

from megarank.config import DEFAULT_EVAL_BATCH_TOKENS

log = logging.getLogger("megarank.scoring")


class Ranked(NamedTuple):
    """One passage of a ``rerank`` call: its position in the passages given, and its score (an fp32 logit)."""

    index: int
    score: float


class EvaluationResult(NamedTuple):
    """``evaluate_beir``'s outcome (the same on every rank); unpacks as ``metrics, first_stage, scores``.

    metrics: the reranked run's IR metrics ({"nDCG@10": ..., "MRR@10": ..., "RR@10": ..., "R@10": ..., "R@100": ...}; recall cut-offs above top_k are named at top_k: R@20 for top_k=20);
    first_stage: the same metrics of the first-stage run at the same depth;
    scores: {qid: {docid: score}} of every reranked candidate (NaN scores kept as NaN).
    """

    metrics: dict
    first_stage: dict
    scores: dict


def _batches(pairs, queries, corpus, pair_tokenizer, *, batch_size, batch_tokens, packing):
    """Length-sorted scoring batches ``(pairs, batch)`` of ``pairs`` (keys into ``queries`` / ``corpus``): the
    one place this module builds batches, with the batcher evaluation uses (``megarank.data.batcher``)."""
    from megarank.scoring.batched import scoring_batcher

    return scoring_batcher(pair_tokenizer, packing).scoring_batches(  # packing: one stream of whole pairs
        pairs, queries, corpus, batch_size=batch_size, batch_tokens=batch_tokens)


def _best_first(score: float, index: int) -> tuple:
    """Sort key: higher scores first, NaN after every number, ties by position."""
    return (True, 0.0, index) if math.isnan(score) else (False, -score, index)


def _is_hf_folder(path: Path) -> bool:
    """A Hugging Face model folder (config.json), not a megarank checkpoint or run folder (config.yaml / latest)."""
    from megarank.checkpoint.layout import CONFIG_FILE, LATEST

    return (path / "config.json").is_file() and not (path / CONFIG_FILE).is_file() and not (path / LATEST).is_file()


def _convert_hf(path: Path, overrides: list):
    """(Config, {key: global tensor}, tokenizer folder or None) of an HF folder, converted in memory as
    ``megarank-convert hf-to-megatron`` would (nothing written); a conversion error becomes a CheckpointError."""
    from checkpoint_tools.errors import ConversionError  # here: megarank imports checkpoint_tools only for HF folders
    from checkpoint_tools.import_hf import hf_to_megatron_in_memory

    from megarank.checkpoint import CheckpointError

    try:
        return hf_to_megatron_in_memory(path, overrides=tuple(overrides))
    except ConversionError as e:
        raise CheckpointError(str(e)) from None


def _load_hf_tokenizer(cfg, folder: Path):
    """The pair tokenizer on an HF folder's tokenizer files. They are read from a copy holding only them, so that
    AutoTokenizer never looks at the folder's config.json and modeling code (an export's ``auto_map``)."""
    import tempfile

    from checkpoint_tools.tokenizer_files import copy_tokenizer

    from megarank.data.tokenizer_factory import make_pair_tokenizer

    with tempfile.TemporaryDirectory(prefix="megarank-tokenizer.") as tmp:
        copy_tokenizer(folder, tmp)
        return make_pair_tokenizer(cfg, tmp)


def _padded_where_packing_cannot_run(cfg) -> None:
    """Scoring with ``data.packing`` on a model that cannot attend within packed sequences (Transformer Engine in
    fp32: ``megarank evaluate --dtype fp32`` on a GPU; megatron's own attention) scores padded batches instead,
    with a log line: the scores are the same either way (tests/test_packing.py), only slower."""
    from megarank.config import packed_attention_problem

    if cfg.data.packing and (problem := packed_attention_problem(cfg.model)):
        log.info("scoring padded batches, not packed: %s", problem.split(";")[0])
        cfg.data.packing = False


def _rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def _start_parallel(cfg, seed: bool) -> bool:
    """Make sure torch.distributed and megatron's groups exist for ``cfg.parallel``; True when this call started
    the process group (a plain process: one in-process rank). Groups already set up at the same TP/PP/CP (another
    Reranker's, the caller's) are kept, so the models built on them stay usable; ``seed``: seed the weights' RNG
    with ``train.seed`` either way (random init)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megarank.parallel.init import init_distributed, set_seed

    p = cfg.parallel
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    if (dist.is_initialized() and parallel_state.model_parallel_is_initialized()
            and parallel_state.get_tensor_model_parallel_world_size() == tp
            and parallel_state.get_pipeline_model_parallel_world_size() == pp
            and parallel_state.get_context_parallel_world_size() == cp):
        if seed:
            set_seed(cfg.train.seed)
        return False
    started = not dist.is_initialized()
    init_distributed(tp, pp, p.backend, seed=cfg.train.seed, cp=cp)
    return started


LAYOUT_KEYS = ("parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size",
               "parallel.context_parallel_size")


def _fit_layout_to_world(cfg, overrides: Sequence[str], source) -> None:
    """Score at the checkpoint's TP x PP when this world holds it, else (unless the overrides chose a layout) at TP 1 x
    PP 1 with a log line: checkpoints load at any layout (megatron's dist checkpoints reshard), so a model trained
    at TP 2 scores in one process. A layout the overrides chose that the world cannot hold is a ConfigError."""
    import torch.distributed as dist

    from megarank.config import ConfigError

    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1") or 1)
    p = cfg.parallel
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    if world % (tp * pp * cp) == 0:
        return
    if any(o.split("=", 1)[0].strip() in LAYOUT_KEYS for o in overrides):
        raise ConfigError(f"parallel.tensor_model_parallel_size x pipeline_model_parallel_size x context_parallel_size "
                          f"= {tp} x {pp} x {cp} does not divide the world size {world}")
    if not dist.is_initialized() or dist.get_rank() == 0:
        log.info("scoring at TP 1 x PP 1 x CP 1: %s was trained at TP %d x PP %d x CP %d, which %d process(es) cannot "
                 "hold (any layout loads; set parallel.tensor_model_parallel_size / context_parallel_size to choose)",
                 source, tp, pp, cp, world)
    p.tensor_model_parallel_size = p.pipeline_model_parallel_size = p.context_parallel_size = 1
    p.sequence_parallel = False


class Reranker:
    """A megarank reranker model with its pair tokenizer and batching, ready to score.

    Build one with :meth:`from_checkpoint`, or wrap a model that is already built and loaded (the training
    loop's, DDP-wrapped or not) with ``Reranker(model, pair_tokenizer, cfg)``: ``cfg`` is the run's Config, whose
    ``data`` section gives the input (template, max_length), the batching (``eval_batch_tokens``,
    ``eval_batch_size``) and ``packing``; ``pair_tokenizer`` None builds it from ``cfg`` on first use
    (``megarank.data.tokenizer_factory``). Nothing is loaded or initialised by the constructor.

    Attributes: ``model``, ``cfg``, ``pair_tokenizer``, ``checkpoint`` (the step folder or HF folder loaded, or
    None), ``dtype`` and ``dtype_reason`` (what runs and why), ``batch_tokens`` / ``batch_size`` (None = no pair
    bound) / ``packing``, and ``model_tokens`` (tokens the model ran, padding included, in ``score`` and ``rerank``).
    """

    def __init__(self, model, pair_tokenizer, cfg, *, checkpoint=None, dtype: Optional[str] = None,
                 dtype_reason: Optional[str] = None):
        self.model = model
        self.cfg = cfg
        self._pair_tokenizer = pair_tokenizer
        self._make_tokenizer = None  # set by from_checkpoint: the checkpoint's tokenizer, built on first use
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.dtype = dtype or cfg.model.dtype
        self.dtype_reason = dtype_reason or "the model's dtype"
        self.batch_tokens = cfg.data.eval_batch_tokens
        self.batch_size = cfg.data.eval_batch_size or None
        self.packing = cfg.data.packing
        self.model_tokens = 0
        self._owns_process_group = False

    # ------------------------------------------------------------------------------------------ construction

    @classmethod
    def from_checkpoint(cls, path, dtype: str = "auto", batch_tokens: int = DEFAULT_EVAL_BATCH_TOKENS,
                        batch_size: Optional[int] = None, overrides: Sequence[str] = ()) -> "Reranker":
        """Load a reranker from ``path``: a megarank checkpoint folder (``step-N`` or converted), a run folder
        (the step its ``latest`` names) or a Hugging Face model folder with ``config.json`` (an export, NVIDIA's
        ``llama_bidirec`` rerankers, ``LlamaForSequenceClassification``, ``LlamaForCausalLM`` with a new seeded
        head), converted in memory as ``megarank-convert hf-to-megatron`` does, nothing written.

        dtype: ``auto`` (bf16 where bf16 matmuls are native, else the checkpoint's), ``fp32`` or ``bf16``; the
            weights are cast on load. batch_tokens: token budget per scoring batch (0 = fixed batches of
            ``batch_size``, 32 by default); batch_size: at most this many pairs per batch (default none with a budget).
        overrides: dotted ``section.key=value`` strings applied to the checkpoint's config, e.g.
            ``parallel.tensor_model_parallel_size=2`` under torchrun, ``data.packing=false``.

        Works in a plain Python process (one in-process rank) and under torchrun at any TP/PP/DP: every rank calls
        it with the same arguments. A folder that cannot be loaded raises a one-sentence ``CheckpointError``.
        """
        import torch.distributed as dist

        from megarank.checkpoint import load_checkpoint_config, load_model_weights, resolve_checkpoint
        from megarank.checkpoint.weights import load_global_tensors
        from megarank.config import apply_overrides, config_from_dict, config_to_dict, validate
        from megarank.data.tokenizer_factory import make_pair_tokenizer, resolve_tokenizer_dir
        from megarank.hardware import resolve_inference_dtype
        from megarank.model import build_model
        from megarank.parallel.init import device

        overrides = list(overrides)
        apply_overrides({}, overrides)  # keys and value types first: a typo fails before anything is read
        if batch_tokens < 0:
            raise ValueError(f"batch_tokens must be >= 0 (0 = fixed batches of batch_size), got {batch_tokens}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be None or >= 1, got {batch_size}")
        path = Path(path)
        tensors = hf_tokenizer = None
        hf = path.is_dir() and _is_hf_folder(path)
        if hf:
            cfg, tensors, hf_tokenizer = _convert_hf(path, overrides)
            source = path
        else:
            source = resolve_checkpoint(path)
            cfg = load_checkpoint_config(source)
        # The checkpoint fixes the model; the overrides may change the layout (TP/PP) and data settings.
        cfg = config_from_dict(apply_overrides(config_to_dict(cfg), overrides))
        cfg.data.eval_batch_tokens = batch_tokens
        cfg.data.eval_batch_size = batch_size or (0 if batch_tokens else 32)
        _fit_layout_to_world(cfg, overrides, source)
        owns = _start_parallel(cfg, seed=False)
        # Weights are stored in the checkpoint's dtype and cast on load: torch DCP copies each stored tensor into
        # the model's own (torch/distributed/checkpoint/filesystem.py:914, `target_tensor.copy_(tensor)`), so an
        # fp32 checkpoint loads into a bf16 model as exactly its bf16 rounding (tests/test_scoring_batches.py);
        # load_global_tensors copies the same way.
        run_dtype, reason = resolve_inference_dtype(dtype, cfg.model.dtype, device())
        cfg.model.dtype = run_dtype
        _padded_where_packing_cannot_run(cfg)
        validate(cfg, world_size=dist.get_world_size(), training=False)
        if dist.get_rank() == 0:
            log.info("scoring in %s (%s)", run_dtype, reason)
        model = build_model(cfg.model, cfg.parallel, init_weights=False)  # every weight is loaded (strictly) below
        if hf:
            load_global_tensors(model, tensors, where=str(path))
            del tensors  # the model holds its own shards now
        else:
            load_model_weights(model, source)
        model.eval()
        reranker = cls(model, None, cfg, checkpoint=source, dtype=run_dtype, dtype_reason=reason)
        reranker._owns_process_group = owns
        if hf_tokenizer is not None and not cfg.data.tokenizer:  # the HF folder's own tokenizer files
            reranker._make_tokenizer = lambda: _load_hf_tokenizer(cfg, Path(hf_tokenizer))
        else:  # data.tokenizer, the checkpoint's tokenizer/, else the built-in tiny one
            checkpoint_dir = None if hf else str(source)
            reranker._make_tokenizer = lambda: make_pair_tokenizer(cfg, resolve_tokenizer_dir(cfg, checkpoint_dir))
        return reranker

    @classmethod
    def from_config(cls, config=None, overrides: Sequence[str] = ()) -> "Reranker":
        """A reranker with freshly initialised random weights (megatron's init, seeded by ``train.seed``: the same
        weights on every layout), nothing loaded: what a training run starts from without ``checkpoint.load``.

        config: a ``Config``, a YAML path, or None (megarank's defaults); ``overrides`` are applied to it. Runs in
        ``model.dtype``. Starts torch.distributed like ``from_checkpoint``; the tokenizer is ``data.tokenizer``,
        ``<checkpoint.load>/tokenizer`` or the built-in tiny one, built on first use.
        """
        import torch.distributed as dist

        from megarank.config import Config, apply_overrides, config_from_dict, config_to_dict, load_config, validate
        from megarank.model import build_model

        if isinstance(config, Config):
            cfg = config_from_dict(apply_overrides(config_to_dict(config), list(overrides)))
        else:
            cfg = load_config(None if config is None else str(config), list(overrides))
        owns = _start_parallel(cfg, seed=True)
        _padded_where_packing_cannot_run(cfg)
        validate(cfg, world_size=dist.get_world_size(), training=False)
        model = build_model(cfg.model, cfg.parallel).eval()
        reranker = cls(model, None, cfg, dtype_reason="the config's model.dtype")
        reranker._owns_process_group = owns
        return reranker

    @property
    def pair_tokenizer(self):
        """The ``PairTokenizer`` (BOS + ``data.template``, no EOS, cut to ``data.max_length``: passage first, the query
        down to ``data.max_query_length``), built on first use; ``.truncation`` counts the pairs it cut."""
        if self._pair_tokenizer is None:
            if self._make_tokenizer is None:
                from megarank.data.tokenizer_factory import make_pair_tokenizer, resolve_tokenizer_dir

                self._pair_tokenizer = make_pair_tokenizer(self.cfg, resolve_tokenizer_dir(self.cfg))
            else:
                self._pair_tokenizer = self._make_tokenizer()
        return self._pair_tokenizer

    # ------------------------------------------------------------------------------------------------ scoring

    def score(self, pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
        """One relevance logit per (query, passage) pair: an fp32 CPU tensor of shape [len(pairs)], in input order.

        Raw logits (no sigmoid), as the model's head gives them divided by ``model.temperature``. Pairs are scored
        in length-sorted batches (``batch_tokens`` / ``batch_size``, packed when ``packing``); the scores do not
        depend on the batching (fp32 rounding aside). Collective: every rank passes the same pairs.
        """
        from megarank.scoring.batched import score_batches

        if self.cfg.model.num_labels != 1:
            raise ValueError(f"score() gives one logit per pair (model.num_labels 1); this model has "
                             f"model.num_labels {self.cfg.model.num_labels}: run reranker.model on encoded pairs")
        pairs = list(pairs)
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
                raise TypeError(f"pairs[{i}] must be a (query, passage) pair of strings, got {pair!r:.80}")
        if not pairs:
            return torch.empty(0, dtype=torch.float32)
        queries = {i: q for i, (q, _) in enumerate(pairs)}
        passages = {i: p for i, (_, p) in enumerate(pairs)}
        keys = [(i, i) for i in range(len(pairs))]
        before = self.pair_tokenizer.truncation.copy()
        batches = _batches(keys, queries, passages, self.pair_tokenizer, batch_size=self.batch_size,
                           batch_tokens=self.batch_tokens, packing=self.packing)
        scores = score_batches(self.model, self._counted(batches))
        # one line, from the first call that cuts pairs: later calls only count (pair_tokenizer.truncation)
        self.pair_tokenizer.log_truncation_once("score", "pairs scored", since=before, enabled=_rank0())
        return torch.tensor([scores[k] for k in keys], dtype=torch.float32)

    def rerank(self, query: str, passages: Sequence[str], top_k: Optional[int] = None) -> list[Ranked]:
        """Score every passage against ``query``; returns ``Ranked(index, score)`` for the best ``top_k`` (all when
        None) sorted best first: highest score first, ties by position in ``passages``, NaN scores last.
        ``index`` is the passage's position in ``passages``. Collective, like ``score``."""
        if isinstance(passages, str):
            raise TypeError("passages must be a sequence of strings, not one string")
        scores = self.score([(query, p) for p in passages]).tolist()
        order = sorted(range(len(scores)), key=lambda i: _best_first(scores[i], i))
        if top_k is not None:
            order = order[: max(top_k, 0)]
        return [Ranked(i, scores[i]) for i in order]

    def evaluate_beir(self, folder, split: str = "test", *, run: Optional[str] = None, top_k: int = 100,
                      max_queries: Optional[int] = None, nan_last: bool = False, parts_dir=None,
                      queries_per_part: int = 1000, progress: bool = True) -> EvaluationResult:
        """Rerank a BEIR split's first-stage top-``top_k`` and measure it against the first stage itself.

        folder: BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv); run: the first-stage run (TREC,
        BEIR TSV or MS MARCO; default ``<folder>/candidates/<split>.*``); max_queries: only the first N judged
        queries of the run. A NaN score is an error in the metrics unless ``nan_last``, which ranks such
        candidates last (the returned scores keep the NaNs). ``parts_dir``: save the scores of every
        ``queries_per_part`` queries there as they are scored, so that the same call after a kill scores only the
        rest (megarank/scoring/parts.py; the folder is checked to hold the same job: data, run, top-k, model,
        dtype). ``progress``: log pairs done, pairs/s and ETA. Collective; every rank gets the result.
        """
        from megarank.scoring.beir import evaluate_beir

        metrics, first_stage, scores = evaluate_beir(
            self.model, self.pair_tokenizer, str(folder), split, run_path=None if run is None else str(run), top_k=top_k,
            batch_size=self.batch_size, max_queries=max_queries, nan_last=nan_last, packing=self.packing,
            batch_tokens=self.batch_tokens, parts_dir=parts_dir, queries_per_part=queries_per_part,
            model_id={"model": str(self.checkpoint.resolve()) if self.checkpoint else None, "dtype": self.dtype},
            progress=progress)
        return EvaluationResult(metrics, first_stage, scores)

    # ---------------------------------------------------------------------------------------------- the rest

    def _counted(self, batches):
        for keys, batch in batches:
            self.model_tokens += batch["input_ids"].numel()
            yield keys, batch

    def close(self) -> None:
        """End torch.distributed and megatron's groups if ``from_checkpoint`` / ``from_config`` started them (a
        caller's own process group is left alone); every model on them, this one included, is unusable after."""
        if self._owns_process_group:
            from megarank.parallel.init import destroy_distributed

            destroy_distributed()
            self._owns_process_group = False

    def __enter__(self) -> "Reranker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f"{self.checkpoint}" if self.checkpoint is not None else "a model in memory"
        return (f"Reranker({where}, dtype={self.dtype}, batch_tokens={self.batch_tokens}, "
                f"batch_size={self.batch_size}, packing={self.packing})")
