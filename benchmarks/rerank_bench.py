"""Reranking throughput: megarank's scorer (what `megarank rerank` runs: length-sorted batches, no grad) vs
`sentence_transformers.CrossEncoder` on the same exported model and the same candidate list, in one process
with the same threads and batch size. Prints pairs/s for each and the ratio megarank / CrossEncoder.

    python benchmarks/rerank_bench.py --checkpoint runs/q/train --data ../shared/data/cranfield --max-queries 10 --top-k 20
    python benchmarks/rerank_bench.py ... --device cuda --dtype bf16        # on a GPU

The HF side is exported from the same checkpoint with `megarank-convert megatron-to-hf` (unless --hf is given).
CrossEncoder receives (query, passage) text pairs and tokenizes them as a pair; megarank formats one string
with its template. Token counts differ by a few template tokens per pair, which the report shows.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def megarank_scores(step_dir, pairs, queries, corpus, batch_size, dtype):
    from megarank import checkpoint as ckpt
    from megarank.config import apply_overrides, config_from_dict, config_to_dict
    from megarank.data import batches_for_pairs
    from megarank.inference import score_batches
    from megarank.model import build_model
    from megarank.parallel.init import init_distributed
    from megarank.training.data import make_pair_tokenizer, resolve_tokenizer_dir

    cfg = ckpt.load_checkpoint_config(step_dir)
    cfg = config_from_dict(apply_overrides(config_to_dict(cfg), [f"model.dtype={dtype}", "model.transformer_impl=local"]))
    init_distributed(1, 1)
    model = build_model(cfg.model, cfg.parallel)
    ckpt.load_model_weights(model, step_dir)
    tok = make_pair_tokenizer(cfg, resolve_tokenizer_dir(cfg, str(step_dir)))
    score_batches(model, batches_for_pairs(pairs[:batch_size], queries, corpus, batch_size, tok))  # warm-up
    t = time.perf_counter()
    scores = score_batches(model, batches_for_pairs(pairs, queries, corpus, batch_size, tok))
    elapsed = time.perf_counter() - t
    tokens = sum(tok.lengths([queries[q] for q, _ in pairs], [corpus[d] for _, d in pairs]))
    return scores, elapsed, tokens, cfg.data.max_length


def crossencoder_scores(hf_dir, pairs, queries, corpus, batch_size, device, dtype, max_length):
    import torch
    from sentence_transformers import CrossEncoder

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = CrossEncoder(str(hf_dir), trust_remote_code=True, device=device, max_length=max_length,
                         model_kwargs={"dtype": torch_dtype})
    texts = [(queries[q], corpus[d]) for q, d in pairs]
    model.predict(texts[:batch_size], batch_size=batch_size)  # warm-up
    t = time.perf_counter()
    scores = model.predict(texts, batch_size=batch_size, show_progress_bar=False)
    return scores, time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="megarank checkpoint folder or run dir with `latest`")
    p.add_argument("--hf", default=None, help="exported HF folder (default: export the checkpoint to a temp dir)")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cranfield"))
    p.add_argument("--split", default="test")
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--max-queries", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = p.parse_args()
    from megarank.data import candidate_pairs, find_run_file, read_beir, read_run
    from megarank.checkpoint import resolve_checkpoint

    step_dir = resolve_checkpoint(args.checkpoint)
    beir = read_beir(args.data, args.split)
    run = read_run(find_run_file(args.data, args.split))
    qids = [q for q in run if q in beir.qrels][: args.max_queries]
    pairs = candidate_pairs(beir.queries, beir.corpus, {q: run[q] for q in qids}, args.top_k)
    hf_dir = Path(args.hf) if args.hf else Path(tempfile.mkdtemp()) / "hf"
    if not args.hf:
        subprocess.run([sys.executable, "-m", "checkpoint_tools", "megatron-to-hf", str(step_dir), str(hf_dir), "--quiet"], check=True)
    ours, t_ours, tokens, max_length = megarank_scores(step_dir, pairs, beir.queries, beir.corpus, args.batch_size, args.dtype)
    theirs, t_theirs = crossencoder_scores(hf_dir, pairs, beir.queries, beir.corpus, args.batch_size, args.device, args.dtype, max_length)
    import torch

    report = {
        "pairs": len(pairs), "max_length": max_length, "megarank_tokens": tokens, "threads": torch.get_num_threads(), "device": args.device,
        "dtype": args.dtype, "batch_size": args.batch_size,
        "megarank_pairs_per_s": len(pairs) / t_ours, "crossencoder_pairs_per_s": len(pairs) / t_theirs,
        "ratio_megarank_over_crossencoder": t_theirs / t_ours,
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
