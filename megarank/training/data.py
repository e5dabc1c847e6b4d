"""Build the training data pipeline (group source, DP-sharded sampler, pair tokenizer, micro-batcher) from the config."""
import dataclasses
import functools
from pathlib import Path
from typing import Callable

from megarank.config import TEACHER_LOSSES, Config
from megarank.data import (
    Batcher,
    BeirGroupSource,
    BlendedGroupSource,
    DataError,
    GroupSampler,
    GroupsFileSource,
    find_run_file,
    read_beir,
    read_run,
    read_scored_run,
    sample_data_dir,
)
from megarank.data.formats import check_prompts, open_groups
from megarank.data.holdout import TrainingPart
from megarank.data.tokenizer_factory import make_pair_tokenizer, resolve_tokenizer_dir, tiny_tokenizer_dir
from megarank.training.loss import group_loss

__all__ = ["blend_names", "make_blend", "make_group_source", "make_loss", "make_valid_source", "make_micro_batcher", "make_pair_tokenizer", "make_sampler", "resolve_tokenizer_dir", "tiny_tokenizer_dir",
           "training_groups_file"]


def make_group_source(cfg: Config):
    """The training groups the config names (one source, or a ``data.blend`` of several), carrying teacher scores
    when ``train.loss`` reads them. Every bad line, row or record is a DataError naming it, raised here, before the
    model is built."""
    d = cfg.data
    if d.blend:
        return make_blend(cfg)
    return _training_part(cfg, _source(cfg, d.format, d.train_path, d.train_split, d.train_run,
                                       dataclasses.asdict(d.columns)), 0)


def _training_part(cfg: Config, source, number: int):
    """``source`` less its held-out groups (``data.valid_fraction``; megarank/data/holdout.py), or ``source``."""
    fraction = cfg.data.valid_fraction
    return TrainingPart(source, fraction, cfg.train.seed, number) if fraction > 0 else source


def make_valid_source(cfg: Config):
    """``data.valid_path`` read as a training source of ``data.valid_format`` (or ``data.format``) is, at its
    ``data.valid_split`` (or ``data.train_split``), with ``data.columns``; None without it."""
    d = cfg.data
    if d.valid_path is None:
        return None
    return _source(cfg, d.valid_format or d.format, d.valid_path, d.valid_split or d.train_split, None,
                   dataclasses.asdict(d.columns))


def make_blend(cfg: Config) -> BlendedGroupSource:
    """``data.blend``: each entry's source read as a single source of its format is, blended by weight
    (megarank/data/blend.py), named by its path's last part (made unique) in the per-source counts."""
    entries = cfg.data.blend
    sources = [_training_part(cfg, _source(cfg, e.format, e.path, e.split, e.run, dataclasses.asdict(e.columns)), i)
               for i, e in enumerate(entries)]
    return BlendedGroupSource(sources, [e.weight for e in entries], blend_names(cfg), seed=cfg.train.seed,
                              query_prefixes=[e.query_prefix for e in entries])


def blend_names(cfg: Config) -> list[str]:
    """The name of each blend source in logs and TensorBoard: the last part of its path, with ``#<entry index>``
    added where two sources share it."""
    names = [Path(e.path).name or str(e.path) for e in cfg.data.blend]
    return [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _source(cfg: Config, fmt: str, path, split: str, run_path, columns: dict):
    """One source: a groups file of ``fmt``, or a BEIR folder (``path`` null = the built-in sample) + its run."""
    d = cfg.data
    n_neg = d.n_passages - 1
    with_teacher = cfg.train.loss in TEACHER_LOSSES
    if fmt != "beir":
        # every groups format: through an index built once and memory-mapped (megarank/data/formats/index.py)
        groups, _ = open_groups(fmt, path, columns=columns, split=split, skip_bad=d.skip_bad_lines)
        if fmt == "jsonl":
            check_prompts(groups, d.template)  # FlagEmbedding's per-line prompt must be in the one template
        return GroupsFileSource(groups, n_neg, seed=cfg.train.seed, path_for_errors=path,
                                positives_per_group=d.positives_per_group, with_teacher=with_teacher,
                                rotate_positives=d.rotate_positives, sample_negatives=d.sample_negatives,
                                repeat_negatives=d.repeat_negatives)
    folder = path or str(sample_data_dir())
    run_path = run_path or find_run_file(folder, split)
    beir = read_beir(folder, split)
    teacher = read_scored_run(d.teacher_run) if with_teacher else None
    return BeirGroupSource(beir, read_run(run_path), n_neg, top_k=d.negatives_top_k, seed=cfg.train.seed,
                           run_path=run_path, positives_per_group=d.positives_per_group, teacher=teacher)


def make_loss(cfg: Config) -> Callable:
    """``(scores, relevance, teacher) -> mean loss over groups`` as ``train.loss`` / ``teacher_temperature`` /
    ``distill_weight`` say (megarank/training/loss.py)."""
    t = cfg.train
    return functools.partial(group_loss, t.loss, teacher_temperature=t.teacher_temperature,
                             distill_weight=t.distill_weight)


def training_groups_file(cfg: Config) -> str:
    """The file whose records or judgements are the training groups: the groups file or folder, or the BEIR
    split's qrels."""
    d = cfg.data
    if d.blend:
        return "data.blend (" + ", ".join(str(e.path) for e in d.blend) + ")"
    if d.format != "beir":
        return str(d.train_path)
    return str(Path(d.train_path or sample_data_dir()) / "qrels" / f"{d.train_split}.tsv")


def make_sampler(cfg: Config, num_groups: int, dp_rank: int, dp_size: int) -> GroupSampler:
    """The DP-sharded sampler; too few groups for one global batch is a DataError naming the file and the key
    (raised before the model is built: the loop builds the source and the sampler first)."""
    gb = cfg.train.global_batch_size
    if num_groups < gb:
        what = "training groups" if cfg.data.format != "beir" or cfg.data.blend else \
            "training groups (queries with a judged-relevant document and candidates)"
        raise DataError(f"{training_groups_file(cfg)}: {num_groups} {what} cannot fill one global batch "
                        f"(train.global_batch_size={gb}); lower it or add groups")
    return GroupSampler(num_groups, gb, dp_rank, dp_size, seed=cfg.train.seed)


def make_micro_batcher(cfg: Config, pair_tokenizer) -> Callable[[list], list]:
    """One step's query groups -> its micro-batches, as the config says: ``train.micro_batch_size`` groups or up to
    ``train.micro_batch_tokens``, padded or packed (``data.packing``, the stream a multiple of TP; every sequence
    splittable over CP ranks):
    megarank/data/batcher.py, built once per run."""
    p = cfg.parallel
    batcher = Batcher(pair_tokenizer, packed=cfg.data.packing, tensor_parallel_size=p.tensor_model_parallel_size,
                      context_parallel_size=p.context_parallel_size)
    return functools.partial(batcher.micro_batches, micro_batch_size=cfg.train.micro_batch_size,
                             micro_batch_tokens=cfg.train.micro_batch_tokens)
