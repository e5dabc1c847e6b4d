"""Build the training data pipeline (group source, DP-sharded sampler, pair tokenizer) from the config."""
import os
from pathlib import Path
from typing import Optional

from megarank.config import Config
from megarank.data import (
    BeirGroupSource,
    GroupSampler,
    JsonlGroupSource,
    PairTokenizer,
    build_tiny_tokenizer,
    find_run_file,
    load_tokenizer,
    read_beir,
    read_jsonl_groups,
    read_run,
    sample_data_dir,
)


def tiny_tokenizer_dir() -> Path:
    """Where the built-in byte-level tokenizer is built (once) for the tiny default model."""
    root = Path(os.environ.get("MEGARANK_CACHE", Path.home() / ".cache" / "megarank"))
    return root / "tiny-tokenizer"


def resolve_tokenizer_dir(cfg: Config, checkpoint_dir: Optional[str] = None) -> Path:
    """data.tokenizer, else the checkpoint's tokenizer/, else the built-in tiny tokenizer."""
    if cfg.data.tokenizer:
        return Path(cfg.data.tokenizer)
    for candidate in (checkpoint_dir, cfg.checkpoint.load):
        if candidate and (Path(candidate) / "tokenizer").is_dir():
            return Path(candidate) / "tokenizer"
    path = tiny_tokenizer_dir()
    build_tiny_tokenizer(path)
    return path


def make_pair_tokenizer(cfg: Config, tokenizer_dir) -> PairTokenizer:
    return PairTokenizer(
        load_tokenizer(tokenizer_dir),
        max_length=cfg.data.max_length,
        pad_to_multiple_of=cfg.data.pad_to_multiple_of,
        template=cfg.data.template,
    )


def make_group_source(cfg: Config):
    d = cfg.data
    n_neg = d.n_passages - 1
    if d.format == "jsonl":
        groups, _ = read_jsonl_groups(d.train_path, skip_bad_lines=d.skip_bad_lines)
        return JsonlGroupSource(groups, n_neg, seed=cfg.train.seed, path_for_errors=d.train_path)
    folder = d.train_path or str(sample_data_dir())
    run_path = d.train_run or find_run_file(folder, d.train_split)
    beir = read_beir(folder, d.train_split)
    return BeirGroupSource(beir, read_run(run_path), n_neg, top_k=d.negatives_top_k, seed=cfg.train.seed, run_path=run_path)


def make_sampler(cfg: Config, num_groups: int, dp_rank: int, dp_size: int) -> GroupSampler:
    return GroupSampler(num_groups, cfg.train.global_batch_size, dp_rank, dp_size, seed=cfg.train.seed)
