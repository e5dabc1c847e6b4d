"""`megarank evaluate` / `megarank rerank`: load a checkpoint at any TP/PP, rerank a BEIR split, report (a thin
wrapper of ``megarank.Reranker``: ``from_checkpoint`` then ``evaluate_beir``).

The arguments are checked first (the checkpoint and data exist, --out / --metrics-out can be written), before
torch and megatron-core are imported, so that a typo fails in a second and not after all the scoring; the
outputs are written to temporary files and renamed, so an existing --out is replaced whole or not at all.
"""
import json
import shutil
from pathlib import Path

from megarank.cli.preflight import UsageError, beir_problem, check_input, check_output_file, checkpoint_problem
from megarank.files import atomic_write_text


def check_evaluation_args(args) -> None:
    """Everything about the command line that can be checked without the model; raises UsageError (and
    ConfigError for an override of an unknown key or with a value of the wrong type)."""
    from megarank.config import apply_overrides

    apply_overrides({}, list(args.overrides))  # keys and types only: the values land on the checkpoint's config
    if problem := checkpoint_problem(args.checkpoint):
        raise UsageError(f"checkpoint {args.checkpoint} {problem}")
    if problem := beir_problem(args.data, args.split):
        raise UsageError(f"--data {args.data} {problem}")
    check_input(args.run, "--run", "file")
    check_output_file(args.out, "--out")
    check_output_file(args.metrics_out, "--metrics-out")
    if args.out and args.metrics_out and Path(args.out).resolve() == Path(args.metrics_out).resolve():
        raise UsageError(f"--out and --metrics-out are the same file ({args.out})")


def parts_folder(out: str) -> Path:
    """Where ``rerank --out OUT`` saves its scored parts until OUT is written: ``OUT.parts`` beside it."""
    target = Path(out)
    return target.with_name(target.name + ".parts")


def _readable(metrics: dict) -> str:
    return " ".join(f"{name} {value:.4f}" for name, value in metrics.items())


def run_evaluation(args) -> int:
    check_evaluation_args(args)
    import torch.distributed as dist

    from megarank.scoring.metrics import write_trec_run
    from megarank.scoring import Reranker

    reranker = Reranker.from_checkpoint(args.checkpoint, dtype=args.dtype, batch_tokens=args.batch_tokens,
                                        batch_size=args.batch_size, overrides=args.overrides)
    parts_dir = parts_folder(args.out) if args.out else None
    result = reranker.evaluate_beir(args.data, args.split, run=args.run, top_k=args.top_k, max_queries=args.max_queries,
                                    parts_dir=parts_dir, queries_per_part=args.queries_per_part)
    if dist.get_rank() == 0:
        print(f"{len(result.scores)} queries, top {args.top_k}: megarank {_readable(result.metrics)} | first stage "
              f"{_readable(result.first_stage)}", flush=True)
        report = {"checkpoint": str(reranker.checkpoint), "split": args.split, "top_k": args.top_k,
                  "queries": len(result.scores), "megarank": result.metrics, "first_stage": result.first_stage,
                  "dtype": reranker.dtype, "dtype_reason": reranker.dtype_reason, "batch_tokens": reranker.batch_tokens,
                  "batch_size": reranker.batch_size, "packing": reranker.packing}
        print(json.dumps(report), flush=True)  # first: the metrics survive even a disk that fills up below
        if args.out:
            write_trec_run(args.out, result.scores, tag="megarank")
            shutil.rmtree(parts_dir, ignore_errors=True)  # the merged run is in place: the parts served their turn
        if args.metrics_out:
            atomic_write_text(args.metrics_out, json.dumps(report, indent=1) + "\n")  # mode 0666 & ~umask, as --out
    reranker.close()
    return 0
