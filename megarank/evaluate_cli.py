"""`megarank evaluate` / `megarank rerank`: load a checkpoint at any TP/PP, rerank a BEIR split, report."""
import json
import logging
from pathlib import Path

import torch.distributed as dist

from megarank import checkpoint as ckpt
from megarank.config import apply_overrides, config_from_dict, config_to_dict, validate

log = logging.getLogger("megarank.evaluate")


def run_evaluation(args) -> int:
    from megarank.evaluation import evaluate_beir
    from megarank.metrics import write_trec_run
    from megarank.model import build_model
    from megarank.parallel.init import destroy_distributed, init_distributed
    from megarank.training.data import make_pair_tokenizer, resolve_tokenizer_dir

    step_dir = ckpt.resolve_checkpoint(args.checkpoint)
    cfg = ckpt.load_checkpoint_config(step_dir)
    # The checkpoint fixes the model; the command line may change the layout (TP/PP) and data settings.
    cfg = config_from_dict(apply_overrides(config_to_dict(cfg), list(args.overrides)))
    p = cfg.parallel
    init_distributed(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.backend, seed=cfg.train.seed)
    validate(cfg, world_size=dist.get_world_size())
    model = build_model(cfg.model, cfg.parallel)
    ckpt.load_model_weights(model, step_dir)
    pair_tokenizer = make_pair_tokenizer(cfg, resolve_tokenizer_dir(cfg, str(step_dir)))
    ours, first_stage, scores = evaluate_beir(
        model, pair_tokenizer, args.data, args.split, args.run, args.top_k, args.batch_size, args.max_queries
    )
    if dist.get_rank() == 0:
        report = {"checkpoint": str(step_dir), "split": args.split, "top_k": args.top_k,
                  "queries": len(scores), "megarank": ours, "first_stage": first_stage}
        if args.out:
            write_trec_run(args.out, scores, tag="megarank")
        if args.metrics_out:
            Path(args.metrics_out).write_text(json.dumps(report, indent=1))
        print(json.dumps(report))
    destroy_distributed()
    return 0
