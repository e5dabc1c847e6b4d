"""The one typed configuration of megarank: dataclasses, strict YAML loading, dotted overrides, validation.

    cfg = load_config("configs/tiny.yaml", ["train.lr=1e-5", "parallel.tensor_model_parallel_size=2"])
    validate(cfg, world_size=4)          # raises ConfigError listing every problem, each naming its key

Every field carries its documentation in ``metadata["help"]``; ``megarank config-help`` prints them all.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key(s)."""


def _f(default, help: str, **kw):
    """A dataclass field with its documentation attached."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: _copy(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _copy(value):
    import copy

    return copy.deepcopy(value)


@dataclass
class RopeScalingConfig:
    """Llama-3 RoPE frequency scaling (HF ``rope_scaling`` with ``rope_type: llama3``)."""

    factor: float = _f(8.0, "Scaling factor: 32 for Llama 3.2, 8 for Llama 3.1.")
    low_freq_factor: float = _f(1.0, "Wavelengths above original_max_position_embeddings/low_freq_factor are divided by factor.")
    high_freq_factor: float = _f(4.0, "Wavelengths below original_max_position_embeddings/high_freq_factor are kept.")
    original_max_position_embeddings: int = _f(8192, "Context length the base model was pretrained with.")


@dataclass
class ModelConfig:
    """Architecture of the bidirectional Llama reranker."""

    num_layers: int = _f(2, "Number of transformer layers.")
    hidden_size: int = _f(64, "Model width.")
    ffn_hidden_size: int = _f(128, "SwiGLU intermediate size (HF intermediate_size).")
    num_attention_heads: int = _f(4, "Query heads.")
    num_query_groups: int = _f(2, "Key/value heads (GQA groups; HF num_key_value_heads).")
    kv_channels: Optional[int] = _f(None, "Head dimension; null = hidden_size / num_attention_heads.")
    vocab_size: int = _f(259, "Tokenizer vocabulary size (unpadded, as in HF config.json).")
    make_vocab_size_divisible_by: int = _f(128, "The embedding is padded to a multiple of this times TP.")
    max_position_embeddings: int = _f(131072, "Maximum sequence length of the base model.")
    rope_theta: float = _f(500000.0, "RoPE base (HF rope_theta).")
    rope_scaling: Optional[RopeScalingConfig] = _f(None, "Llama-3 RoPE scaling; null = none.")
    norm_eps: float = _f(1e-5, "RMSNorm epsilon (HF rms_norm_eps).")
    tie_word_embeddings: bool = _f(False, "Whether the base LM tied lm_head to the embedding (metadata only).")
    pooling: Literal["avg", "last", "cls"] = _f("avg", "How token states become one vector: mean / last / first valid token.")
    temperature: float = _f(1.0, "Scores are divided by this.")
    num_labels: int = _f(1, "Outputs of the score head (1 = one relevance logit).")
    init_method_std: float = _f(0.02, "Std of normal init for new weights (and the new score head).")
    attention_dropout: float = _f(0.0, "Dropout on attention probabilities.")
    hidden_dropout: float = _f(0.0, "Dropout after attention and MLP.")
    transformer_impl: Literal["auto", "transformer_engine", "local"] = _f(
        "auto", "Layer implementation: Transformer Engine (GPU, FP8) or megatron-core local; auto = TE if importable with CUDA."
    )
    attention_backend: Literal["sdpa", "megatron"] = _f(
        "sdpa", "Local-spec core attention: torch scaled_dot_product_attention or megatron-core's DotProductAttention."
    )
    dtype: Literal["fp32", "bf16", "fp16"] = _f("fp32", "Compute dtype of parameters and activations (bf16 = fp32 master weights in the optimizer).")
    fp8: Optional[Literal["hybrid", "e4m3"]] = _f(None, "FP8 format through Transformer Engine (needs TE + CUDA); null = off.")
    fp8_recipe: Literal["delayed", "tensorwise"] = _f("tensorwise", "FP8 scaling recipe: delayed or tensorwise (current scaling).")
    fp8_first_last_bf16: bool = _f(False, "Keep the first and last transformer layers in bf16 under FP8.")
    recompute_granularity: Optional[Literal["full", "selective"]] = _f(
        None,
        "Activation recomputation (GPU only): selective = the submodules in recompute_modules, full = whole layers; "
        "null = off.",
    )
    recompute_num_layers: int = _f(1, "Layers per recompute chunk for recompute_granularity=full.")
    recompute_modules: list[Literal["core_attn", "mlp", "layernorm"]] = _f(
        ["core_attn"],
        "What recompute_granularity=selective recomputes. core_attn: the attention core (drops the s x s "
        "probabilities that megatron's DotProductAttention, attention_backend=megatron, keeps for backward; "
        "Transformer Engine's flash/fused attention and SDPA's fused kernels keep no score matrix, so little to "
        "save there); mlp: the whole MLP (drops its 2 x ffn-wide fc1 output, the widest activation per token, "
        "for one extra MLP forward); layernorm: the norms (local spec only; TE fuses them into the next linear, "
        "where this does nothing).",
    )
    gradient_accumulation_fusion: bool = _f(
        True,
        "TE GEMMs accumulate weight gradients straight into the fp32 main_grad of megatron DDP (no bf16 grad "
        "tensor and add per micro-batch). Used only when training with Transformer Engine on CUDA.",
    )
    bias_swiglu_fusion: bool = _f(
        True,
        "megatron's fused SwiGLU kernel in the TE spec's MLP (one elementwise kernel instead of chunk/silu/mul). "
        "Used only with Transformer Engine on CUDA; the local spec has its own single-function SwiGLU.",
    )
    apply_rope_fusion: bool = _f(
        True, "Transformer Engine's fused RoPE kernel for q and k. Used only with Transformer Engine on CUDA."
    )
    lora_rank: int = _f(
        0,
        "LoRA: rank r of the low-rank adapters added to the frozen base linears (model/adapters.py); 0 = off (full "
        "fine-tuning). With LoRA only the adapters and the score head train, the base comes from checkpoint.load, "
        "and checkpoints hold the trained tensors only. Must be a multiple of parallel.tensor_model_parallel_size.",
    )
    lora_alpha: float = _f(32.0, "LoRA: the adapters' output is scaled by lora_alpha / lora_rank.")
    lora_dropout: float = _f(0.0, "LoRA: dropout on each adapter's input, in [0, 1).")
    lora_targets: list[Literal["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]] = _f(
        ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
        "LoRA: the base linears that get adapters: linear_qkv (fused q/k/v), linear_proj (attention output), "
        "linear_fc1 (fused gate/up), linear_fc2 (down).",
    )
    lora_train_final_norm: bool = _f(False, "LoRA: also train the final RMSNorm in full (the score head always trains).")

    # Derived values, defined once here (litgpt's Config.__post_init__ plays this part): properties, so a dotted
    # override or a YAML change can never leave them stale, and they are never written to config.yaml.
    @property
    def head_dim(self) -> int:
        """kv_channels, or hidden_size / num_attention_heads when it is null."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def padded_vocab(self, tensor_parallel_size: int = 1) -> int:
        """Rows of the embedding at this TP (the same for every TP dividing make_vocab_size_divisible_by)."""
        return padded_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by, tensor_parallel_size)

    @property
    def torch_dtype(self):
        return torch_dtype(self.dtype)


@dataclass
class ParallelConfig:
    """How the model and data are split over processes."""

    tensor_model_parallel_size: int = _f(1, "Tensor-parallel size (TP).")
    pipeline_model_parallel_size: int = _f(1, "Pipeline-parallel size (PP).")
    sequence_parallel: bool = _f(False, "Shard norms/dropout activations along the sequence over TP ranks (needs TP > 1).")
    context_parallel_size: int = _f(
        1,
        "Context-parallel size (CP): every sequence of a micro-batch is split over CP ranks (each holds chunks r and "
        "2CP-1-r of the sequence, megatron's and Transformer Engine's DualChunkSwap layout), attention sees the whole "
        "sequence, pooling and the score combine the ranks' parts. For 8K-32K-token documents. World size = "
        "TP x PP x CP x DP. Batches are padded to a multiple of CP x lcm(data.pad_to_multiple_of, 2 x TP), packed sequences each to 2 x CP; on the "
        "transformer_engine spec it needs data.packing=true (TE's context-parallel attention takes a padding mask "
        "only for packed, THD, batches).",
    )
    use_distributed_optimizer: bool = _f(True, "Shard optimizer state over data-parallel ranks (ZeRO-1).")
    overlap_grad_reduce: bool = _f(
        True,
        "Start each gradient bucket's data-parallel all-reduce / reduce-scatter during the backward pass. "
        "GPU only (CUDA streams); same numbers.",
    )
    overlap_param_gather: bool = _f(
        True,
        "With the distributed optimizer: all-gather the updated parameters bucket by bucket during the next "
        "forward instead of all at once after the optimizer step. GPU only; same numbers.",
    )
    backend: Literal["auto", "nccl", "gloo"] = _f("auto", "torch.distributed backend; auto = nccl with CUDA, gloo without.")


# Scoring budget of `evaluate` / `rerank` and training-time evaluation: 32 pairs of 512 tokens (the peak
# activations of the old fixed batch of 32 at max_length 512); shorter pairs go in larger batches.
DEFAULT_EVAL_BATCH_TOKENS = 16384


@dataclass
class ColumnsConfig:
    """Column names of a Parquet / datasets training table (data.format parquet or hf_disk)."""

    query: str = _f("query", "The query: a string.")
    pos_doc: str = _f("pos_doc", "The positives: a list of documents (strings or {title, text} structs) or one.")
    neg_doc: str = _f("neg_doc", "The negatives: a list of documents or one.")
    pos_scores: str = _f("pos_scores", "Optional: the teacher's logit per positive (read when the column exists).")
    neg_scores: str = _f("neg_scores", "Optional: the teacher's logit per negative (read when the column exists).")
    pos_labels: str = _f("pos_labels", "Optional: the graded relevance per positive, > 0 (read when the column exists).")


# data.format values whose groups come from one file or folder of groups (megarank/data/formats); beir is the other.
GROUP_FILE_FORMATS = ("jsonl", "nemo_corpus", "parquet", "hf_disk", "triples")


@dataclass
class BlendSourceConfig:
    """One source of a blend (data.blend): path, format and weight are required."""

    path: Optional[str] = _f(None, "The source's groups file or folder, or its BEIR folder (format beir). Required.")
    format: Optional[Literal["jsonl", "beir", "nemo_corpus", "parquet", "hf_disk", "triples"]] = _f(
        None, "The source's format, as data.format. Required.")
    weight: float = _f(0.0, "The source's share of the groups drawn, relative to the other sources' weights; > 0. "
                       "Required.")
    split: str = _f("train", "format beir: the qrels split; hf_disk: the DatasetDict split.")
    run: Optional[str] = _f(None, "format beir: the first-stage run; null = <path>/candidates/<split>.*.")
    columns: ColumnsConfig = _f(ColumnsConfig(), "format parquet / hf_disk: the column of each field, as data.columns.")
    n_passages: int = _f(0, "Passages per group; 0 = data.n_passages, the only other value allowed: every source of "
                         "a blend gives groups of one size.")
    query_prefix: str = _f("", "Text put before each of this source's queries (a task instruction); the same text "
                           "must start the queries you score with the trained model.")


@dataclass
class DataConfig:
    """Training and evaluation data."""

    format: Literal["jsonl", "beir", "nemo_corpus", "parquet", "hf_disk", "triples"] = _f(
        "beir", "Training groups from: jsonl (NeMo AutoModel inline or FlagEmbedding JSONL), beir (a BEIR folder + "
        "first-stage run), nemo_corpus (NeMo AutoModel corpus-id JSON + corpus folders), parquet (a file or folder), "
        "hf_disk (a datasets save_to_disk folder), triples (MS MARCO query/positive/negative TSV). docs/data.md.")
    train_path: Optional[str] = _f(None, "The training groups file or folder of data.format; a BEIR folder for "
                                   "format=beir (null = built-in sample).")
    train_split: str = _f("train", "BEIR qrels split used for training; the split of an hf_disk DatasetDict folder.")
    columns: ColumnsConfig = _f(ColumnsConfig(), "format=parquet / hf_disk: the column of each field "
                                "(e.g. {query: question, pos_doc: positive, neg_doc: negative}).")
    rotate_positives: bool = _f(True, "Groups files: the positives a group holds move by positives_per_group each "
                                "epoch; false = always the first ones (NeMo AutoModel without cycle_positive_docs).")
    sample_negatives: bool = _f(True, "Groups files: a group's negatives are a random sample of its record's, drawn "
                                "anew each epoch; false = the first ones in file order (NeMo AutoModel).")
    repeat_negatives: bool = _f(False, "Groups files: a record with fewer negatives than a group needs repeats them "
                                "cyclically (NeMo AutoModel) instead of being an error.")
    train_run: Optional[str] = _f(None, "First-stage run for hard negatives; null = <train_path>/candidates/<split>.*.tsv.")
    n_passages: int = _f(5, "Passages per query group: data.positives_per_group positives + hard negatives.")
    positives_per_group: int = _f(1, "Positives per group (rotating over a query's positives each epoch; a query with "
                                  "fewer fills the group with negatives). Graded qrels / JSONL pos_labels become the "
                                  "targets of listnet, plistmle, lambda and ranknet; listwise spreads its target over them.")
    negatives_top_k: int = _f(100, "Hard negatives are drawn from the run's top-k minus judged-relevant docs.")
    teacher_run: Optional[str] = _f(None, "format=beir: a scored TREC run (`megarank rerank` with a teacher) giving the "
                                    "teacher's logit for every positive and candidate; needed by the kl, margin_mse "
                                    "and mse losses. JSONL groups carry pos_scores/neg_scores instead.")
    tokenizer: Optional[str] = _f(None, "Tokenizer folder; null = the checkpoint's tokenizer, else the built-in tiny one.")
    max_length: int = _f(512, "Tokens per query-passage sequence (BOS included). A longer pair loses passage tokens "
                         "from the passage's end first, then query tokens down to data.max_query_length; the "
                         "template's text is always kept (docs/data.md#truncation).")
    max_query_length: Optional[int] = _f(None, "Tokens a query keeps however long its passage: a pair over "
                                         "data.max_length cuts the query (from its end) only down to this, the rest "
                                         "from the passage. null = half of what BOS and the template's text leave "
                                         "(e.g. 244 of 512 with the default template and the tiny tokenizer); must "
                                         "leave the passage at least one token.")
    pad_to_multiple_of: int = _f(8, "Each batch is right-padded to its longest sequence rounded up to a multiple of this.")
    template: str = _f("question:{query} \n \n passage:{passage}", "Prompt template of one sequence.")
    packing: bool = _f(True, "Pack each micro-batch / scoring batch into one token stream of whole sequences (no padding; "
                       "attention stays inside each sequence): same scores and gradients as padded batches (fp32 "
                       "rounding). On by default because it is faster: 1.33-1.40x the padded real tokens/s (1.31-1.38x "
                       "a transformers cross-encoder's) in fp32 and 1.23-1.32x (1.26-1.31x) in bf16 on SciFact "
                       "training micro-batches, SmolLM2-135M shape, AVX512-BF16 CPU, 5 runs (benchmarks/RESULTS.md). Needs "
                       "model.attention_backend sdpa on the local spec (megatron's DotProductAttention cannot pack).")
    skip_bad_lines: bool = _f(False, "Groups files: count, report and skip malformed lines / rows / records instead "
                              "of failing on the first.")
    blend: list[BlendSourceConfig] = _f([], "Train from several sources: a list of {path, format, weight} entries "
                                        "(optional split, run, columns, n_passages, query_prefix), groups drawn in "
                                        "proportion to the weights, each source running its own epochs "
                                        "(docs/data.md#blends); instead of data.train_path / format / train_split / "
                                        "train_run / columns. [] = one source, data.train_path.")
    valid_path: Optional[str] = _f(None, "Held-out validation groups: a groups file or folder (or a BEIR folder) read "
                                   "like the training source, in data.valid_format; its loss (train.loss), acc@1 and "
                                   "MRR are reported every train.eval_interval steps and at the end "
                                   "(docs/data.md#validation). null = none (see data.valid_fraction).")
    valid_format: Optional[Literal["jsonl", "beir", "nemo_corpus", "parquet", "hf_disk", "triples"]] = _f(
        None, "The format of data.valid_path; null = data.format (required with data.blend). Parquet / hf_disk read "
              "data.columns.")
    valid_split: Optional[str] = _f(None, "data.valid_path's BEIR qrels split (its first-stage run: "
                                    "candidates/<split>.*) or hf_disk DatasetDict split; null = data.train_split.")
    valid_fraction: float = _f(0.0, "Hold out this fraction of each training source's groups (round(fraction x "
                               "groups), at least 1), chosen by train.seed, never drawn for training and validated "
                               "as data.valid_path is (per source for a blend); in [0, 1), 0 = off. Changes the "
                               "training data: a resume checks it.")
    valid_max_groups: int = _f(256, "Validation groups evaluated, at most, per source (held-out part of each "
                               "training source, and data.valid_path): the first ones of data.valid_path, a seeded "
                               "sample of the held-out ones. Keeps the validation pass cheap.")
    eval_path: Optional[str] = _f(None, "BEIR folder for evaluation; null = no evaluation during training.")
    eval_split: str = _f("test", "Qrels split for evaluation.")
    eval_run: Optional[str] = _f(None, "First-stage run to rerank; null = <eval_path>/candidates/<split>.*.tsv.")
    eval_top_k: int = _f(100, "Candidates reranked per query.")
    eval_max_queries: Optional[int] = _f(None, "Evaluate on the first N queries only (quick dev checks).")
    eval_batch_size: int = _f(0, "Pairs per scoring batch: an upper bound with data.eval_batch_tokens (0 = none), the batch size "
                              "without it (then it must be positive).")
    eval_batch_tokens: int = _f(DEFAULT_EVAL_BATCH_TOKENS, "Token budget per scoring batch (default: 32 pairs of 512 tokens): length-sorted pairs "
                                "fill each batch while the tokens the model runs (rows x padded length, or the packed "
                                "stream length) stay within it, so short pairs go in larger batches; 0 = fixed "
                                "data.eval_batch_size pairs. Same scores either way.")


# Losses that read the teacher's logits (megarank/training/loss.py NEEDS_TEACHER) and those that compare passages
# within a group (need n_passages >= 2).
TEACHER_LOSSES = frozenset({"kl", "margin_mse", "mse"})
GROUP_LOSSES = frozenset({"listwise", "kl", "margin_mse", "listnet", "plistmle", "lambda", "ranknet"})


@dataclass
class TrainConfig:
    """Optimisation (defaults: NVIDIA's public Llama 3.2 1B reranker recipe)."""

    steps: int = _f(1000, "Optimizer steps.")
    global_batch_size: int = _f(128, "Query groups per optimizer step over all data-parallel ranks.")
    micro_batch_size: int = _f(1, "Query groups per micro-batch per data-parallel rank.")
    micro_batch_tokens: int = _f(0, "Token budget per micro-batch: whole query groups fill each micro-batch up to this many "
                                 "model tokens (packed stream length, or rows x padded length); replaces micro_batch_size; "
                                 "0 = fixed micro_batch_size. The step still takes global_batch_size groups, same loss.")
    loss: Literal["listwise", "pointwise", "kl", "margin_mse", "mse", "listnet", "plistmle", "lambda", "ranknet"] = _f(
        "listwise", "listwise: softmax CE over each group; pointwise: BCE per pair; distillation from teacher logits "
        "(JSONL pos_scores/neg_scores or data.teacher_run): kl (KL to the teacher's softmax at "
        "train.teacher_temperature), margin_mse (MSE of positive-minus-negative margins), mse (MSE of logits); "
        "learning to rank on graded labels: listnet, plistmle, lambda (LambdaLoss, NDCG-Loss2++), ranknet. "
        "megarank/training/loss.py states each formula and its source.")
    teacher_temperature: float = _f(1.0, "Temperature of the teacher's softmax in the kl loss (Tevatron's Megatron "
                                    "reranker uses 2.0); > 0.")
    distill_weight: float = _f(1.0, "kl / margin_mse / mse: loss = w * distillation + (1 - w) * listwise CE on the "
                               "hard labels; in [0, 1].")
    lr: float = _f(3e-6, "Peak learning rate.")
    min_lr: float = _f(0.0, "Final learning rate of the decay.")
    lr_warmup_steps: int = _f(100, "Linear warm-up steps.")
    lr_decay_style: Literal["cosine", "linear", "constant"] = _f("cosine", "Decay after warm-up.")
    weight_decay: float = _f(0.01, "AdamW weight decay (not applied to norms).")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_eps: float = _f(1e-8, "AdamW epsilon.")
    clip_grad: float = _f(1.0, "Global gradient-norm clipping; 0 = off.")
    seed: int = _f(1234, "Seed of weights init, data order and dropout.")
    max_nonfinite_steps: int = _f(5, "Stop after this many consecutive steps with NaN/Inf loss or gradients (each is skipped).")
    log_interval: int = _f(1, "Log a line every N steps.")
    eval_interval: int = _f(0, "Evaluate on data.eval_path and the validation groups (data.valid_path, "
                            "data.valid_fraction) every N steps; 0 = only at the end, when they are set.")
    allow_changed_data: bool = _f(
        False,
        "Resume a run folder although what it trains on changed. A resume compares the config with the saved "
        "config.yaml of the step it resumes and refuses, before the model is built, any change of the training "
        "data (data.format, train_path, train_split, train_run, teacher_run, blend, n_passages, positives_per_group, "
        "negatives_top_k, columns, rotate_positives, sample_negatives, repeat_negatives, valid_fraction), the input (data.template, "
        "max_length, max_query_length), the objective (train.loss, teacher_temperature, distill_weight) or the score (model.pooling, temperature); true resumes anyway, with a warning listing "
        "the changes. Free to change on resume: steps, the lr schedule, optimizer settings, intervals, batch split, "
        "parallel layout, dtype, checkpoint and logging keys (docs/checkpoints.md). train.seed and the architecture "
        "cannot change.",
    )


@dataclass
class CheckpointConfig:
    """Distributed checkpoints."""

    dir: Optional[str] = _f(None, "Where step-N/ folders and the `latest` marker go; null = no saving.")
    load: Optional[str] = _f(None, "Initial weights: a megarank checkpoint (e.g. converted from HF); ignored when resuming.")
    save_interval: int = _f(0, "Save every N steps (and always at the end); 0 = only at the end.")
    keep_last: int = _f(2, "Keep the last K step folders; 0 = keep all.")
    save_optimizer: bool = _f(True, "Save optimizer/scheduler state for exact resume.")


@dataclass
class LoggingConfig:
    """Logs and event files."""

    tensorboard_dir: Optional[str] = _f(None, "TensorBoard event files; null = <checkpoint.dir>/tensorboard when saving.")
    level: Literal["DEBUG", "INFO", "WARNING"] = _f("INFO", "Python logging level.")
    wandb_project: Optional[str] = _f(None, "Weights & Biases project; null = no W&B logging (off by default). Needs "
                                      "`pip install wandb`; logs what TensorBoard gets, plus the resolved config.")
    wandb_entity: Optional[str] = _f(None, "W&B entity (team or user); null = your W&B default.")
    wandb_name: Optional[str] = _f(None, "W&B run name; null = <SLURM job name>-<SLURM job id> under SLURM, else the "
                                   "checkpoint folder's name.")
    wandb_group: Optional[str] = _f(None, "W&B group; null = the SLURM job name under SLURM, else none.")
    wandb_mode: Literal["online", "offline"] = _f("online", "offline: W&B writes the run under logging.wandb_dir only "
                                                  "(no network; upload later with `wandb sync DIR`).")
    wandb_dir: Optional[str] = _f(None, "W&B's files; null = <checkpoint.dir>/wandb when saving, else ./wandb. A "
                                  "resumed or requeued run with the same checkpoint.dir continues the same W&B run.")


@dataclass
class Config:
    """Everything a megarank run needs."""

    model: ModelConfig = _f(ModelConfig(), "Model architecture.")
    parallel: ParallelConfig = _f(ParallelConfig(), "Parallel layout.")
    data: DataConfig = _f(DataConfig(), "Data.")
    train: TrainConfig = _f(TrainConfig(), "Optimisation.")
    checkpoint: CheckpointConfig = _f(CheckpointConfig(), "Checkpoints.")
    logging: LoggingConfig = _f(LoggingConfig(), "Logging.")


# ----------------------------------------------------------------------------------------------- loading


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp, key: str):
    """Check/convert one YAML value to the annotated type; errors name the key."""
    origin = get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            # PyYAML (YAML 1.1) reads exponent floats without a dot, e.g. `lr: 1e-5`, as strings.
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _from_dict(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]!s}; valid keys of {prefix or 'the top level'}: {', '.join(names)}"
            " (run `megarank config-help` for their meaning)"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict) -> Config:
    """Build a Config from a nested dict, rejecting unknown keys and wrong types."""
    return _from_dict(Config, data or {})


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _override_type(parts: list[str], item: str):
    """The annotated type of the Config field a dotted override names; errors blame the command line."""
    tp, walked = Config, []
    for part in parts:
        if get_origin(tp) is typing.Union:  # Optional[Section]
            tp = next(a for a in get_args(tp) if a is not type(None))
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"command-line override {item}: {'.'.join(walked)} is not a section")
        names = [f.name for f in dataclasses.fields(tp)]
        if part not in names:
            key = ".".join([*walked, part])
            raise ConfigError(f"command-line override {item}: unknown key {key}; valid keys of "
                              f"{'.'.join(walked) or 'the top level'}: {', '.join(names)}"
                              " (run `megarank config-help` for their meaning)")
        tp = typing.get_type_hints(tp)[part]
        walked.append(part)
    return tp


def _check_override(parts: list[str], value: Any, item: str) -> None:
    """Type-check one override's value on its own, so a bad value is blamed on the command line, not the YAML."""
    dotted = ".".join(parts)
    tp = _override_type(parts, item)
    try:
        _coerce(value, tp, dotted)
    except ConfigError as e:
        problem = str(e)
        problem = problem[len(dotted) + 2:] if problem.startswith(f"{dotted}: ") else problem
        raise ConfigError(f"command-line override {item}: {problem}") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML scalars) to a nested dict.

    Each override is checked against the Config schema first: an unknown key or a value of the wrong type
    raises a ConfigError that quotes the override (``command-line override train.lr=abc: expected a number``).
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command-line override {item!r} is not of the form section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if not all(parts):
            raise ConfigError(f"command-line override {item!r} is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"command-line override {item}: the value is not valid YAML "
                              f"({getattr(e, 'problem', None) or e})") from None
        _check_override(parts, value, item)
        node = data
        for part in parts[:-1]:
            if node.get(part) is None:  # an absent section, or an Optional one that is null (rope_scaling)
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"command-line override {item}: {part} is not a section")
        node[parts[-1]] = value
    return data


def _read_yaml(path: str) -> dict:
    """The YAML mapping in `path`; a missing file, bad bytes or bad YAML is one sentence naming the file."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {path} is a folder, expected a YAML file")
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path} line {line}: is not valid UTF-8 (byte 0x{raw[e.start]:02x})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML config (or the defaults when path is None) strictly, then apply dotted overrides.

    Errors name their source: the YAML file (with its line where YAML gives one) or the command-line override.
    """
    data = _read_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def save_config(cfg: Config, path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _yaml_value(value) -> str:
    """A default as it is written in a config file (``null``, ``false``, ``listwise``, ``{factor: 32.0}``)."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


def _allowed(hint) -> str:
    """`` [one of: a | b]`` for a Literal (optional or not) field, else ''."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    literal = hint if typing.get_origin(hint) is typing.Literal else next(
        (a for a in args if typing.get_origin(a) is typing.Literal), None)
    if literal is None:
        return ""
    values = [_yaml_value(v) for v in typing.get_args(literal)]
    if type(None) in typing.get_args(hint):
        values.append("null")
    return f" [one of: {' | '.join(values)}]"


def config_help() -> str:
    """Every key as YAML (``key: default``, the default in YAML syntax) with its allowed values and documentation:
    the output is itself a valid config file."""
    lines = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        lines.append(f"{section.name}:  # {section.metadata['help']}")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {f.name}: {_yaml_value(default)}  #{_allowed(hints[f.name])} {f.metadata['help']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- validation


def transformer_engine_available() -> bool:
    """True when CUDA is present and ``transformer_engine.pytorch`` imports, the test megatron-core itself makes
    (``HAVE_TE``, megatron/core/models/gpt/gpt_layer_specs.py:41-49): a core-only or broken TE install (its
    package found, its PyTorch extension failing to load) counts as absent, so ``auto`` falls back to the local
    spec instead of failing at build. TE is imported only on a machine with CUDA, once per process."""
    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None:
        return False
    return _te_pytorch_imports()


@functools.lru_cache(maxsize=1)
def _te_pytorch_imports() -> bool:
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception:  # noqa: BLE001 - ImportError, OSError (a missing libtransformer_engine.so), RuntimeError...
        return False
    return True


def transformer_engine_version() -> Optional[tuple]:
    """(major, minor) of the installed Transformer Engine distribution, or None (read from its metadata: no import)."""
    from importlib import metadata

    for name in ("transformer-engine", "transformer_engine"):
        try:
            parts = re.findall(r"\d+", metadata.version(name))[:2]
        except metadata.PackageNotFoundError:
            continue
        return tuple(int(x) for x in parts) if len(parts) == 2 else None
    return None


def packed_attention_problem(m: "ModelConfig", env: bool = True) -> Optional[str]:
    """Why this model cannot attend within packed (THD) sequences (a sentence naming the keys), or None. Transformer Engine has no attention
    backend for THD in fp32: flash and fused attention take bf16/fp16 only (TE v2.9
    pytorch/attention/dot_product_attention/utils.py:436-457) and the unfused backend refuses THD (:659-662), so
    dot_product_attention.py raises "No dot product attention backend is available". megatron-core's own
    DotProductAttention asserts packed_seq_params is None (dot_product_attention.py:153)."""
    te = m.transformer_impl == "transformer_engine" or (m.transformer_impl == "auto" and env and transformer_engine_available())
    if te and m.dtype == "fp32":
        return ("data.packing with model.dtype fp32: Transformer Engine has no fp32 attention for packed sequences "
                "(flash and fused attention need bf16 or fp16, the unfused one cannot read packed batches); set "
                "data.packing=false or model.dtype=bf16")
    if not te and m.attention_backend == "megatron":
        return ("data.packing needs model.attention_backend sdpa with the local spec (megatron-core's "
                "DotProductAttention cannot attend within packed sequences); set data.packing=false or "
                "model.attention_backend=sdpa")
    return None


# The config's dtype names -> torch's (megarank.config imports no torch; torch_dtype imports it when called).
TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(name: str):
    """torch.float32 / torch.bfloat16 / torch.float16 for "fp32" / "bf16" / "fp16" (the one dtype map)."""
    import torch

    return getattr(torch, TORCH_DTYPE_NAMES[name])


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Rows of the embedding: the vocabulary padded to a multiple of lcm(divisible_by, tp).

    Megatron-LM pads to a multiple of ``divisible_by * tp``, which makes the embedding's global shape depend
    on TP. With the lcm the shape is the same for every TP that divides ``divisible_by`` (128 covers TP 1, 2,
    4, 8), so checkpoints move between TP sizes with identical shapes, and the rows still split evenly.
    """
    multiple = math.lcm(divisible_by, tp)
    return ((vocab_size + multiple - 1) // multiple) * multiple


def validate(cfg: Config, world_size: Optional[int] = None, check_environment: bool = True,
             training: bool = True) -> None:
    """Check the whole config at once; raise ConfigError listing every problem, each naming its key.

    ``check_environment=False`` skips the checks about this machine (Transformer Engine, CUDA), so a GPU
    config can be checked on a login node (``megarank launch --dry-run``). ``training=False`` (scoring a
    checkpoint) skips what only a training step needs: the split of train.global_batch_size over the data-parallel
    ranks (a model trained at one layout scores at any).
    """
    errors = (_model_errors(cfg.model, check_environment)
              + _parallel_errors(cfg, world_size, check_environment, training)
              + _train_errors(cfg, check_environment) + _gpu_layout_errors(cfg, check_environment)
              + _logging_errors(cfg.logging, check_environment))
    if training and cfg.model.lora_rank > 0 and not cfg.checkpoint.load:
        errors.append("model.lora_rank > 0 trains adapters on a frozen base: set checkpoint.load to the base model's "
                      "checkpoint (e.g. from megarank-convert hf-to-megatron)")
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


def _model_errors(m: ModelConfig, env: bool = True) -> list[str]:
    errs = []
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "vocab_size"):
        if getattr(m, key) <= 0:
            errs.append(f"model.{key} must be positive (got {getattr(m, key)})")
    if m.num_attention_heads > 0 and m.num_query_groups > 0 and m.num_attention_heads % m.num_query_groups:
        errs.append(f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by model.num_query_groups ({m.num_query_groups})")
    if m.kv_channels is None and m.num_attention_heads > 0 and m.hidden_size % m.num_attention_heads:
        errs.append(f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_attention_heads ({m.num_attention_heads}) unless model.kv_channels is set")
    if m.temperature <= 0:
        errs.append(f"model.temperature must be > 0 (got {m.temperature})")
    if m.fp8 is not None:
        if m.transformer_impl == "local":
            errs.append("model.fp8 needs model.transformer_impl transformer_engine (or auto), not local")
        if env and not transformer_engine_available():
            errs.append("model.fp8 needs Transformer Engine and CUDA: pip install 'megarank[gpu]' (or use an NGC PyTorch container) on a GPU machine, or set model.fp8=null")
        if m.dtype == "fp32":
            errs.append("model.fp8 needs model.dtype bf16 (FP8 GEMMs with bf16 elsewhere)")
    errs += _lora_errors(m)
    if env and m.transformer_impl == "transformer_engine" and not transformer_engine_available():
        errs.append("model.transformer_impl=transformer_engine needs Transformer Engine and CUDA: pip install 'megarank[gpu]', or set model.transformer_impl=local")
    return errs


def _lora_errors(m: ModelConfig) -> list[str]:
    if m.lora_rank < 0:
        return [f"model.lora_rank must be >= 0 (got {m.lora_rank}; 0 = no LoRA)"]
    if m.lora_rank == 0:
        return []
    errs = []
    if not m.lora_alpha > 0:
        errs.append(f"model.lora_alpha must be > 0 (got {m.lora_alpha})")
    if not 0.0 <= m.lora_dropout < 1.0:
        errs.append(f"model.lora_dropout must be in [0, 1) (got {m.lora_dropout})")
    if not m.lora_targets:
        errs.append("model.lora_targets must name at least one of linear_qkv, linear_proj, linear_fc1, linear_fc2")
    elif len(set(m.lora_targets)) != len(m.lora_targets):
        errs.append(f"model.lora_targets lists a target twice ({', '.join(m.lora_targets)})")
    return errs


def _parallel_errors(cfg: Config, world_size: Optional[int], env: bool = True, training: bool = True) -> list[str]:
    p, m = cfg.parallel, cfg.model
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    errs = []
    if tp < 1 or pp < 1:
        return [f"parallel.tensor_model_parallel_size and parallel.pipeline_model_parallel_size must be >= 1 (got {tp}, {pp})"]
    if m.num_attention_heads % tp:
        errs.append(f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by parallel.tensor_model_parallel_size ({tp})")
    if m.num_query_groups % tp:
        errs.append(f"model.num_query_groups ({m.num_query_groups}) must be divisible by parallel.tensor_model_parallel_size ({tp})")
    if m.ffn_hidden_size % tp:
        errs.append(f"model.ffn_hidden_size ({m.ffn_hidden_size}) must be divisible by parallel.tensor_model_parallel_size ({tp})")
    if m.lora_rank > 0 and m.lora_rank % tp:
        errs.append(f"model.lora_rank ({m.lora_rank}) must be divisible by parallel.tensor_model_parallel_size ({tp}): "
                    "the adapters of column-parallel linears split their rank over TP")
    if m.num_layers % pp:
        errs.append(f"model.num_layers ({m.num_layers}) must be divisible by parallel.pipeline_model_parallel_size ({pp})")
    if p.sequence_parallel and tp == 1:
        errs.append("parallel.sequence_parallel needs parallel.tensor_model_parallel_size > 1")
    cp = p.context_parallel_size
    if cp < 1:
        errs.append(f"parallel.context_parallel_size must be >= 1 (got {cp})")
    elif cp > 1:
        errs.extend(_context_parallel_errors(cfg, env))
    if env and p.backend == "nccl":
        import torch

        if not torch.cuda.is_available():
            errs.append("parallel.backend=nccl needs CUDA; use gloo or auto on CPU")
    if world_size is not None:
        cp = max(p.context_parallel_size, 1)
        if world_size % (tp * pp * cp):
            what = f"tensor x pipeline x context parallel size ({tp} x {pp} x {cp} = {tp * pp * cp})" if cp > 1 else \
                f"tensor x pipeline parallel size ({tp} x {pp} = {tp * pp})"
            errs.append(f"world size {world_size} is not divisible by {what}")
        else:
            dp = world_size // (tp * pp * cp)
            t = cfg.train
            if training and t.global_batch_size % (t.micro_batch_size * dp):
                errs.append(
                    f"train.global_batch_size ({t.global_batch_size}) must be divisible by train.micro_batch_size x data-parallel size ({t.micro_batch_size} x {dp})"
                )
    return errs


def _context_parallel_errors(cfg: Config, env: bool = True) -> list[str]:
    """What context parallelism needs from the rest of the config (megarank/parallel/context.py says how CP works).

    * megatron-core's own DotProductAttention refuses CP (dot_product_attention.py:57-59 in 0.16.1); the local
      spec's SDPA core attention implements it (all-gather of keys and values).
    * Transformer Engine's context-parallel attention accepts a padding mask only in THD format: bshd/sbhd take
      no_mask or causal (TE pytorch/attention/dot_product_attention/utils.py, the "Filter: context parallelism"
      table), and a reranker's padded batches need a key-padding mask; so CP on TE trains and scores packed.
      THD CP needs TE >= 1.10 (megatron/core/utils.py:2066-2069).
    """
    m, d = cfg.model, cfg.data
    te = m.transformer_impl == "transformer_engine" or (m.transformer_impl == "auto" and env and transformer_engine_available())
    errs = []
    if not te and m.attention_backend == "megatron":
        errs.append("parallel.context_parallel_size > 1 needs model.attention_backend sdpa with the local spec "
                    "(megatron-core's DotProductAttention has no context parallelism)")
    if te and not d.packing:
        errs.append("parallel.context_parallel_size > 1 on the transformer_engine spec needs data.packing=true "
                    "(Transformer Engine's context-parallel attention takes a padding mask only for packed batches)")
    if te and env:
        version = transformer_engine_version()
        if version is not None and version < (1, 10):
            errs.append(f"parallel.context_parallel_size > 1 with packed batches needs Transformer Engine >= 1.10 "
                        f"(found {'.'.join(map(str, version))})")
    return errs


def _train_errors(cfg: Config, env: bool = True) -> list[str]:
    t, d = cfg.train, cfg.data
    errs = []
    for key in ("steps", "global_batch_size", "micro_batch_size", "log_interval"):
        if getattr(t, key) <= 0:
            errs.append(f"train.{key} must be positive (got {getattr(t, key)})")
    if d.eval_batch_tokens < 0:
        errs.append(f"data.eval_batch_tokens must be >= 0 (got {d.eval_batch_tokens}; 0 = data.eval_batch_size pairs)")
    elif d.eval_batch_tokens == 0 and d.eval_batch_size < 1:
        errs.append(f"data.eval_batch_size must be positive without data.eval_batch_tokens (got {d.eval_batch_size})")
    if t.micro_batch_tokens < 0:
        errs.append(f"train.micro_batch_tokens must be >= 0 (got {t.micro_batch_tokens}; 0 = micro_batch_size groups)")
    if t.micro_batch_tokens > 0 and cfg.model.fp8 is not None and cfg.model.fp8_recipe == "delayed":
        # Delayed scaling all-reduces amax after every forward; token budgets give DP ranks different numbers
        # of micro-batches (forwards) per step, so those collectives would not match.
        errs.append("train.micro_batch_tokens needs model.fp8_recipe tensorwise (or model.fp8 null): delayed scaling "
                    "needs the same number of micro-batches on every data-parallel rank")
    m = cfg.model
    if d.packing and (problem := packed_attention_problem(m, env)):
        errs.append(problem)
    if t.lr <= 0 or t.min_lr < 0 or t.min_lr > t.lr:
        errs.append(f"train.lr must be > 0 and train.min_lr in [0, lr] (got lr={t.lr}, min_lr={t.min_lr})")
    if d.n_passages < 2 and t.loss in GROUP_LOSSES:
        errs.append(f"data.n_passages must be >= 2 for the {t.loss} loss (got {d.n_passages})")
    if d.positives_per_group < 1 or d.positives_per_group >= max(d.n_passages, 2):
        errs.append(f"data.positives_per_group must be >= 1 and leave a negative in data.n_passages={d.n_passages} "
                    f"(got {d.positives_per_group})")
    if not t.teacher_temperature > 0:
        errs.append(f"train.teacher_temperature must be > 0 (got {t.teacher_temperature})")
    if not 0.0 <= t.distill_weight <= 1.0:
        errs.append(f"train.distill_weight must be in [0, 1] (got {t.distill_weight})")
    elif t.distill_weight != 1.0 and t.loss not in TEACHER_LOSSES:
        errs.append(f"train.distill_weight mixes a distillation loss with the listwise CE; train.loss={t.loss} is not one "
                    f"of {', '.join(sorted(TEACHER_LOSSES))}")
    if d.teacher_run is not None and d.format != "beir":
        errs.append("data.teacher_run is for data.format=beir; JSONL groups carry 'pos_scores'/'neg_scores'")
    if t.loss in TEACHER_LOSSES and d.format == "beir" and d.teacher_run is None and not d.blend:
        errs.append(f"train.loss={t.loss} needs teacher scores: set data.teacher_run to a scored run of the training "
                    "queries (megarank rerank --out with a teacher) or train from JSONL with pos_scores/neg_scores")
    if d.max_length < 8:
        errs.append(f"data.max_length must be >= 8 (got {d.max_length})")
    if "{query}" not in d.template or "{passage}" not in d.template:
        errs.append("data.template must contain {query} and {passage}")
    if d.max_query_length is not None and not 1 <= d.max_query_length < d.max_length - 1:
        errs.append(f"data.max_query_length must be null or in [1, data.max_length - 1) = [1, {d.max_length - 1}) "
                    f"(got {d.max_query_length}): the passage needs room too")
    errs += _valid_errors(cfg)
    if d.blend:
        return errs + _blend_errors(cfg)
    if d.format != "beir" and d.train_path is None:
        errs.append(f"data.train_path must name the training groups when data.format={d.format}")
    if d.format not in ("parquet", "hf_disk") and d.columns != ColumnsConfig():
        errs.append(f"data.columns maps Parquet / datasets columns; data.format={d.format} has fixed field names")
    changed = [k for k in ("rotate_positives", "sample_negatives", "repeat_negatives")
               if getattr(d, k) != getattr(DataConfig, k)]
    if d.format == "beir" and changed:
        errs.append(f"data.{changed[0]} applies to groups files (data.format {', '.join(GROUP_FILE_FORMATS)}), "
                    "not to format=beir")
    return errs


def _valid_errors(cfg: Config) -> list[str]:
    """data.valid_*: a fraction in [0, 1), a positive cap, valid_format / valid_split only beside valid_path, a
    format for it beside a blend, teacher scores for a teacher loss."""
    d, t = cfg.data, cfg.train
    errs = []
    if not (0.0 <= d.valid_fraction < 1.0):
        errs.append(f"data.valid_fraction must be in [0, 1) (got {d.valid_fraction}; 0 = no held-out groups)")
    if d.valid_max_groups < 1:
        errs.append(f"data.valid_max_groups must be >= 1 (got {d.valid_max_groups})")
    if d.valid_path is None:
        errs += [f"data.{key} describes data.valid_path, which is not set"
                 for key in ("valid_format", "valid_split") if getattr(d, key) is not None]
        return errs
    if d.blend and d.valid_format is None:
        errs.append("data.valid_format is required with data.blend: the blend's sources name their own formats")
    fmt = d.valid_format or d.format
    if fmt == "beir" and t.loss in TEACHER_LOSSES and (d.blend or d.teacher_run is None):
        errs.append(f"data.valid_path with format beir: train.loss={t.loss} needs teacher scores of its queries in "
                    "data.teacher_run (a single BEIR training source's); or validate on groups with "
                    "pos_scores/neg_scores")
    return errs


def _blend_errors(cfg: Config) -> list[str]:
    """data.blend: each entry complete and valid, no single-source key beside it, one group size for all."""
    d, t = cfg.data, cfg.train
    errs = [f"data.{key} names the single training source; with data.blend each entry names its own "
            f"({'path' if key == 'train_path' else key})"
            for key, value in (("train_path", d.train_path), ("train_run", d.train_run),
                               ("teacher_run", d.teacher_run)) if value is not None]
    errs += [f"data.{key}={getattr(d, key)} is the single training source's; with data.blend each entry names its own "
             f"({'format' if key == 'format' else 'split'})"
             for key in ("format", "train_split") if getattr(d, key) != getattr(DataConfig, key)]
    if d.columns != ColumnsConfig():
        errs.append("data.columns maps the single training source's columns; with data.blend set each entry's columns")
    formats = get_args(get_args(typing.get_type_hints(BlendSourceConfig)["format"])[0])
    for i, e in enumerate(d.blend):
        at = f"data.blend[{i}]"
        if not e.path:
            errs.append(f"{at}.path is required: the source's groups file or folder")
        if e.format is None:
            errs.append(f"{at}.format is required (one of {', '.join(formats)})")
        if not e.weight > 0 or not math.isfinite(e.weight):
            errs.append(f"{at}.weight must be > 0 (got {e.weight})")
        if e.n_passages not in (0, d.n_passages):
            errs.append(f"{at}.n_passages={e.n_passages} disagrees with data.n_passages={d.n_passages}: every source "
                        f"of a blend gives groups of one size (a micro-batch holds whole groups); set it to "
                        f"{d.n_passages} or leave it out")
        if e.columns != ColumnsConfig() and e.format not in ("parquet", "hf_disk"):
            errs.append(f"{at}.columns maps Parquet / datasets columns; format {e.format} has fixed field names")
        if e.run is not None and e.format != "beir":
            errs.append(f"{at}.run is the first-stage run of a BEIR source; format {e.format} holds its negatives")
        if e.format == "beir" and t.loss in TEACHER_LOSSES:
            errs.append(f"{at}: train.loss={t.loss} needs teacher scores, which a format beir source of a blend does "
                        "not carry; use groups with pos_scores/neg_scores (megarank mine --teacher writes them)")
    return errs


def _logging_errors(lg: LoggingConfig, env: bool = True) -> list[str]:
    if lg.wandb_project is None:  # the other wandb_* keys may stay set: null here turns W&B off
        return []
    if not lg.wandb_project.strip():
        return ["logging.wandb_project must not be empty (null turns W&B off)"]
    if env:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            return ["logging.wandb_project is set but wandb is not installed (pip install wandb)"]
    return []


def _gpu_layout_errors(cfg: Config, env: bool = True) -> list[str]:
    """What megatron-core 0.16.1 and Transformer Engine would reject later, at build time or in a GEMM.

    Every padded batch length (training and evaluation; see PairTokenizer.pad) is a multiple of
    data.pad_to_multiple_of, and an evaluation batch can hold a single sequence (the last of a run).
    """
    m, p, d = cfg.model, cfg.parallel, cfg.data
    tp = p.tensor_model_parallel_size
    if tp < 1:
        return []  # reported by _parallel_errors
    errs = []
    multiple = d.pad_to_multiple_of if d.pad_to_multiple_of > 1 else 1
    if p.sequence_parallel and tp > 1 and multiple % tp:
        # megatron scatters the embedding output over TP ranks along the sequence dimension.
        errs.append(
            f"data.pad_to_multiple_of ({d.pad_to_multiple_of}) must be a multiple of parallel.tensor_model_parallel_size "
            f"({tp}) with parallel.sequence_parallel: every padded batch length is split over the TP ranks"
        )
    if m.fp8 is not None:
        # Every FP8 GEMM of a layer needs its dimensions divisible by 16, the tokens of this rank included
        # (sequence-parallel shard: the local input of linear_qkv / linear_fc1 before the all-gather). TE's Python
        # check asks only 8 of the tokens (transformer_engine/pytorch/utils.py assert_dim_for_fp8_exec, v2.9
        # utils.py:439-447), but that is the forward GEMM's. The backward weight-gradient GEMM (module/linear.py
        # wgrad, NT layout) has the token count as its reduction dimension, and Hopper runs FP8 GEMMs only in TN
        # layout (common/transformer_engine.cpp nvte_is_non_tn_fp8_gemm_supported is false on sm90), so TE feeds it
        # the column-wise (transposed) copies with leading dimension = tokens and cuBLASLt asserts `lda % 16 == 0`
        # ("Caller must pad", common/gemm/cublaslt_gemm.cu:145-149 in v2.9). megatron-core pads FP8 to 16 itself
        # (fp8_utils.py get_fp8_align_size: 16, 32 for MXFP8). The same operand rule makes every weight's output
        # dimension a reduction dimension of the data-gradient GEMM: checked below with 16.
        shard = tp if p.sequence_parallel else 1
        if multiple % (16 * shard):
            need = f"16 x TP {tp} under sequence parallel = {16 * shard}" if shard > 1 else "16"
            errs.append(
                f"data.pad_to_multiple_of ({d.pad_to_multiple_of}) must be a multiple of {need} with model.fp8: "
                "the FP8 weight-gradient GEMMs on Hopper need the tokens on a rank divisible by 16, and an evaluation "
                "batch can be one sequence"
            )
        if m.num_attention_heads > 0 and m.num_query_groups > 0 and not m.num_attention_heads % tp and not m.num_query_groups % tp:
            kv = m.head_dim
            dims = {
                "model.hidden_size (input of linear_qkv and linear_fc1)": (m.hidden_size, 16),
                "(model.num_attention_heads + 2 x model.num_query_groups) x head dim / TP (linear_qkv output)":
                    ((m.num_attention_heads + 2 * m.num_query_groups) * kv // tp, 16),
                "2 x model.ffn_hidden_size per TP rank (linear_fc1 output)": (2 * m.ffn_hidden_size // tp, 16),
                "model.num_attention_heads x head dim / TP (linear_proj input)": (m.num_attention_heads * kv // tp, 16),
                "model.ffn_hidden_size per TP rank (linear_fc2 input)": (m.ffn_hidden_size // tp, 16),
            }
            for what, (value, div) in dims.items():
                if value % div:
                    errs.append(f"model.fp8: {what} is {value}, but Transformer Engine's FP8 GEMMs need a multiple of {div}")
        if m.fp8_recipe == "delayed" and m.fp8_first_last_bf16:
            # megatron-core 0.16.1 transformer_config.py:990-991 raises when the model is built.
            errs.append("model.fp8_first_last_bf16 cannot be used with model.fp8_recipe=delayed (megatron-core rejects it); "
                        "use fp8_recipe=tensorwise or fp8_first_last_bf16=false")
        if m.recompute_granularity == "selective" and "layernorm" in m.recompute_modules:
            if m.fp8_recipe == "delayed":
                # transformer_config.py:1242-1246
                errs.append("model.recompute_modules: layernorm recompute cannot be used with model.fp8_recipe=delayed "
                            "(megatron-core rejects it)")
            elif env and transformer_engine_available():
                from megatron.core.utils import is_te_min_version

                if not is_te_min_version("2.6.0dev0"):  # transformer_config.py:1247-1252
                    errs.append("model.recompute_modules: layernorm recompute with model.fp8 needs transformer-engine >= 2.6")
    if env and m.recompute_granularity is not None:
        import torch

        if not torch.cuda.is_available():
            # megatron's recompute (tensor_parallel.checkpoint) saves the CUDA RNG state (random.py:444-449).
            errs.append(f"model.recompute_granularity={m.recompute_granularity} needs CUDA (megatron's recompute saves "
                        "the CUDA RNG state); set model.recompute_granularity=null on CPU")
    if m.recompute_granularity == "full" and m.recompute_num_layers < 1:
        errs.append(f"model.recompute_num_layers must be >= 1 with model.recompute_granularity=full (got {m.recompute_num_layers})")
    return errs
