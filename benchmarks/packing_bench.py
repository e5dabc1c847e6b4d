"""Real tokens per second of a training forward+backward: megarank packed vs padded micro-batches (issue 11).

    python benchmarks/packing_bench.py                        # SciFact-train, SmolLM2-135M shape, fp32
    python benchmarks/packing_bench.py --groups 1,2 --micro-batches 6 --json /tmp/packing.json

The micro-batches are the trainer's own: megarank's BEIR group source (BM25 hard negatives, ``n_passages`` 5) and
pair tokenizer (SmolLM2's tokenizer from the converted cache, megarank's template, ``max_length`` 512) on
``--data`` (SciFact-train if present, else Cranfield), collated by ``collate_groups`` exactly as
``megarank.training.loop._micro_batches`` does, ``--groups`` query groups per micro-batch. The model has
SmolLM2-135M's shape (read from the cache's config.json; random weights: speed does not depend on them).

Variants, one model, same process, same threads, same micro-batches:
  padded          each micro-batch right-padded to its longest pair (multiple of 8): today's default
  packed-bucket   data.packing: one stream of whole pairs, local attention in length buckets
  packed-loop     the same stream, local attention one SDPA call per sequence (the default)
One step = forward, megarank's listwise loss, backward, grads dropped. After a warm-up of every variant, the
timed steps are interleaved (micro-batch k: padded, packed-bucket, packed-loop; then k+1 ...) so machine load
hits all alike. Reported: real (non-padding) tokens / total step seconds, and the ratio to padded.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MEGARANK_SMOLLM2_CACHE", Path.home() / ".cache" / "megarank" / "smollm2-135m"))
DATA = [Path("/work/shared/data/scifact-train"), ROOT.parent / "shared" / "data" / "scifact-train",
        ROOT.parent / "shared" / "data" / "cranfield"]
VARIANTS = ("padded", "packed-bucket", "packed-loop")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="BEIR folder with candidates/ (default: SciFact-train, else Cranfield)")
    p.add_argument("--model", default=str(CACHE), help="HF folder whose config.json gives the shape and tokenizer")
    p.add_argument("--groups", default="1,2", help="query groups per micro-batch, comma-separated")
    p.add_argument("--micro-batches", type=int, default=4, help="timed micro-batches per --groups value")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--layers", type=int, default=None, help="override the layer count (quick runs)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def cpu_isa() -> str:
    """The CPU model and its matrix/vector ISA flags (what decides fp32 vs bf16 speed)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (lscpu failed)"
    name = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    flags = set(re.findall(r"\b(amx\w*|avx512_bf16|avx512f|avx2)\b", out))
    return f"{name}; flags: {' '.join(sorted(flags)) or 'none of amx/avx512/avx2'}"


def find_data(arg):
    for path in ([Path(arg)] if arg else DATA):
        if (path / "candidates").is_dir():
            return path
    raise SystemExit("no BEIR folder with candidates/ found; pass --data")


def make_config(args, data: Path):
    from megarank.config import load_config

    hf = json.loads((Path(args.model) / "config.json").read_text())
    theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    return load_config(None, [
        f"model.num_layers={args.layers or hf['num_hidden_layers']}", f"model.hidden_size={hf['hidden_size']}",
        f"model.ffn_hidden_size={hf['intermediate_size']}", f"model.num_attention_heads={hf['num_attention_heads']}",
        f"model.num_query_groups={hf['num_key_value_heads']}", f"model.vocab_size={hf['vocab_size']}",
        f"model.rope_theta={theta}", "model.rope_scaling=null", f"model.norm_eps={hf['rms_norm_eps']}",
        "model.transformer_impl=local", "model.dtype=fp32",
        "data.format=beir", f"data.train_path={data}", f"data.tokenizer={args.model}",
        f"data.max_length={args.max_length}", "data.n_passages=5", f"train.seed={args.seed}",
    ])


def micro_batches(cfg, groups_per_micro: int, count: int, seed: int) -> tuple[list, object]:
    """(``count`` training micro-batches of ``groups_per_micro`` groups, the pair tokenizer)."""
    from megarank.data import collate_groups
    from megarank.training.data import make_group_source, make_pair_tokenizer

    tok = make_pair_tokenizer(cfg, cfg.data.tokenizer)
    source = make_group_source(cfg)
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed + groups_per_micro)).tolist()
    n = groups_per_micro
    return [collate_groups([source.get(i, 0) for i in order[k * n:(k + 1) * n]], tok) for k in range(count)], tok


def step(model, batch) -> float:
    from megarank.data.packing import model_inputs
    from megarank.training.loss import listwise_loss

    t0 = time.perf_counter()
    args, kwargs = model_inputs(batch, "cpu")
    listwise_loss(model(*args, **kwargs), batch["group_size"]).backward()
    elapsed = time.perf_counter() - t0
    for p in model.parameters():
        p.grad = None
    return elapsed


def run_variant(model, name, padded, packed) -> float:
    import megarank.model.attention as attention

    if name == "padded":
        return step(model, padded)
    attention.PACKED_ATTENTION = name.split("-")[1]
    return step(model, packed)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from megarank.data.packing import pack_padded
    from megarank.model import build_model
    from megarank.parallel.init import init_distributed

    init_distributed(tp=1, pp=1)
    data = find_data(args.data)
    cfg = make_config(args, data)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.parallel).train()
    load = os.getloadavg()
    print(f"CPU: {cpu_isa()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average {load[0]:.1f} at start")
    print(f"data {data}, model shape {args.model} ({cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}), "
          f"fp32, max_length {args.max_length}, random weights\n")
    print("| groups/micro | micro-batches | real tokens | padded tokens (pad %) | variant | real tokens/s (total) | ratio to padded |")
    print("|---:|---:|---:|---:|---|---:|---:|")
    rows = []
    for g in [int(x) for x in args.groups.split(",")]:
        batches, tok = micro_batches(cfg, g, args.micro_batches + 1, args.seed)
        pairs = [(b, pack_padded(b, tok.pad_id, 8)) for b in batches]
        warm, timed = pairs[0], pairs[1:]
        for name in VARIANTS:
            run_variant(model, name, *warm)
        times = {name: [] for name in VARIANTS}
        for padded, packed in timed:
            for name in VARIANTS:
                times[name].append(run_variant(model, name, padded, packed))
        real = sum(int(p["attention_mask"].sum()) for p, _ in timed)
        padded_tokens = sum(p["input_ids"].numel() for p, _ in timed)
        base = real / sum(times["padded"])
        for name in VARIANTS:
            rate = real / sum(times[name])
            print(f"| {g} | {len(timed)} | {real} | {padded_tokens} ({1 - real / padded_tokens:.1%}) | {name} | "
                  f"{rate:.0f} | {rate / base:.2f} |")
            rows.append({"groups": g, "variant": name, "real_tokens": real, "padded_tokens": padded_tokens,
                         "times_s": times[name], "tokens_per_s": rate, "ratio": rate / base,
                         "median_s": statistics.median(times[name])})
    load_end = os.getloadavg()
    print(f"\nload average {load_end[0]:.1f} at the end")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_isa(), "threads": torch.get_num_threads(),
                                               "load": [load, load_end], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
