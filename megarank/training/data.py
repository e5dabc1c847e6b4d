"""Build the training data pipeline (group source, DP-sharded sampler, pair tokenizer) from the config."""
from megarank.config import Config
from megarank.data import (
    BeirGroupSource,
    GroupSampler,
    JsonlGroupSource,
    find_run_file,
    read_beir,
    read_jsonl_groups,
    read_run,
    sample_data_dir,
)
from megarank.data.tokenizer_factory import make_pair_tokenizer, resolve_tokenizer_dir, tiny_tokenizer_dir

__all__ = ["make_group_source", "make_pair_tokenizer", "make_sampler", "resolve_tokenizer_dir", "tiny_tokenizer_dir"]


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
