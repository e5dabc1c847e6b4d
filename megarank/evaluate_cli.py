"""`megarank evaluate` / `megarank rerank`: load a checkpoint at any TP/PP, rerank a BEIR split, report.

The arguments are checked first (the checkpoint and data exist, --out / --metrics-out can be written), before
torch and megatron-core are imported, so that a typo fails in a second and not after all the scoring; the
outputs are written to temporary files and renamed, so an existing --out is replaced whole or not at all.
"""
import json
import logging
import os
import tempfile
from pathlib import Path

from megarank.preflight import UsageError, beir_problem, check_input, check_output_file

log = logging.getLogger("megarank.evaluate")


def check_evaluation_args(args) -> None:
    """Everything about the command line that can be checked without the model; raises UsageError (and
    ConfigError for an override of an unknown key or with a value of the wrong type)."""
    from megarank.config import apply_overrides

    apply_overrides({}, list(args.overrides))  # keys and types only: the values land on the checkpoint's config
    check_input(args.checkpoint, "checkpoint", "folder")
    if problem := beir_problem(args.data, args.split):
        raise UsageError(f"--data {args.data} {problem}")
    check_input(args.run, "--run", "file")
    check_output_file(args.out, "--out")
    check_output_file(args.metrics_out, "--metrics-out")
    if args.out and args.metrics_out and Path(args.out).resolve() == Path(args.metrics_out).resolve():
        raise UsageError(f"--out and --metrics-out are the same file ({args.out})")


def _write_text_atomically(path: str, text: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_evaluation(args) -> int:
    check_evaluation_args(args)
    import torch.distributed as dist

    from megarank import checkpoint as ckpt
    from megarank.config import apply_overrides, config_from_dict, config_to_dict, validate
    from megarank.evaluation import evaluate_beir
    from megarank.metrics import write_trec_run
    from megarank.model import build_model
    from megarank.hardware import resolve_inference_dtype
    from megarank.parallel.init import destroy_distributed, device, init_distributed
    from megarank.training.data import make_pair_tokenizer, resolve_tokenizer_dir

    step_dir = ckpt.resolve_checkpoint(args.checkpoint)
    cfg = ckpt.load_checkpoint_config(step_dir)
    # The checkpoint fixes the model; the command line may change the layout (TP/PP) and data settings.
    cfg = config_from_dict(apply_overrides(config_to_dict(cfg), list(args.overrides)))
    p = cfg.parallel
    init_distributed(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.backend, seed=cfg.train.seed)
    # The weights are stored in the checkpoint's dtype and cast on load: torch DCP copies each stored tensor into
    # the model's own (torch/distributed/checkpoint/filesystem.py:914, `target_tensor.copy_(tensor)`), so an fp32
    # checkpoint loads into a bf16 model as exactly its bf16 rounding (tests/test_scoring_batches.py).
    dtype, dtype_reason = resolve_inference_dtype(args.dtype, cfg.model.dtype, device())
    cfg.model.dtype = dtype
    validate(cfg, world_size=dist.get_world_size())
    if dist.get_rank() == 0:
        log.info("scoring in %s (%s)", dtype, dtype_reason)
    model = build_model(cfg.model, cfg.parallel)
    ckpt.load_model_weights(model, step_dir)
    pair_tokenizer = make_pair_tokenizer(cfg, resolve_tokenizer_dir(cfg, str(step_dir)))
    batch_size = args.batch_size or (None if args.batch_tokens else 32)
    ours, first_stage, scores = evaluate_beir(
        model, pair_tokenizer, args.data, args.split, args.run, args.top_k, batch_size, args.max_queries,
        packing=cfg.data.packing, batch_tokens=args.batch_tokens,
    )
    if dist.get_rank() == 0:
        report = {"checkpoint": str(step_dir), "split": args.split, "top_k": args.top_k,
                  "queries": len(scores), "megarank": ours, "first_stage": first_stage,
                  "dtype": dtype, "dtype_reason": dtype_reason, "batch_tokens": args.batch_tokens,
                  "batch_size": batch_size, "packing": cfg.data.packing}
        print(json.dumps(report), flush=True)  # first: the metrics survive even a disk that fills up below
        if args.out:
            write_trec_run(args.out, scores, tag="megarank")
        if args.metrics_out:
            _write_text_atomically(args.metrics_out, json.dumps(report, indent=1))
    destroy_distributed()
    return 0
