"""Forward+backward speed: megarank's reranker vs a `transformers` LlamaModel reranker of identical shape.

    python benchmarks/model_bench.py                           # CPU, fp32, ~75M-parameter Llama shape
    python benchmarks/model_bench.py --device cuda --dtype bf16 --iters 20

Variants, all in this process, with the same thread count, shapes, batch and padding:
  megarank-sdpa      megarank local spec, core attention on torch scaled_dot_product_attention (the default)
  megarank-megatron  megarank local spec, megatron-core's DotProductAttention (baddbmm + softmax + bmm)
  transformers       transformers.LlamaModel (attn_implementation="sdpa") with a 4-D additive bidirectional
                     padding mask + mean pooling over valid tokens + Linear(hidden, 1, bias=False)
One step = forward, listwise-style loss (sum of scores), backward, grads set to None. Every variant is warmed
up, then the timed steps are interleaved (variant A, B, C, A, B, C, ...) so drift hits all alike; the table
shows the median. ratio = transformers_time / variant_time (>= 1.0: as fast as transformers or faster).
``--profile VARIANT`` prints torch.profiler's top ops for one step of that variant.
"""
from __future__ import annotations

import argparse

import torch

from megarank.config import torch_dtype
from common import (build_megarank, environment, header, keep_freed_memory, load_average, stopwatch, summary,
                    write_json)

DTYPES = {name: torch_dtype(name) for name in ("fp32", "bf16")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--pad-fraction", type=float, default=0.25, help="share of rows right-padded to 3/4 length")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch.get_num_threads())")
    p.add_argument("--variants", default="megarank-sdpa,megarank-megatron,transformers")
    p.add_argument("--profile", default=None, help="print torch.profiler's top ops for one step of this variant")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument(
        "--keep-freed-memory", action="store_true",
        help="glibc keeps freed memory in the process (steadier timings on a machine short of free memory; "
        "see benchmarks/common.py keep_freed_memory)",
    )
    return p.parse_args(argv)


def make_batch(args, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    lengths = torch.full((args.batch,), args.seq)
    lengths[: int(args.batch * args.pad_fraction)] = (3 * args.seq) // 4
    valid = torch.arange(args.seq)[None, :] < lengths[:, None]
    return ids.to(device), valid.to(device)


# ----------------------------------------------------------------------------------------------- the models


class HFReranker(torch.nn.Module):
    """transformers LlamaModel, bidirectional through a 4-D additive mask, mean pool, bias-free head."""

    def __init__(self, args):
        super().__init__()
        from transformers import LlamaConfig, LlamaModel

        config = LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=args.ffn,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            max_position_embeddings=131072,
            rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192},
            rms_norm_eps=1e-5,
            attention_bias=False,
            mlp_bias=False,
            attn_implementation="sdpa",
        )
        self.model = LlamaModel(config)
        self.score = torch.nn.Linear(args.hidden, 1, bias=False)

    def forward(self, ids, valid):
        dtype = self.score.weight.dtype
        # [b, 1, s, s]: 0 where the key is a real token, dtype-min where it is padding (no causal part)
        keep = valid[:, None, None, :].expand(-1, 1, valid.shape[1], -1)
        mask = torch.zeros(keep.shape, dtype=dtype, device=ids.device).masked_fill(~keep, torch.finfo(dtype).min)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        w = valid.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * w).sum(1) / w.sum(1)
        return self.score(pooled)


def build_transformers(args, device):
    torch.manual_seed(0)
    model = HFReranker(args).to(device=device, dtype=DTYPES[args.dtype]).train()
    return model, model


def build(name, args, device):
    if name in ("megarank-sdpa", "megarank-megatron"):
        model = build_megarank(args, name.split("-")[1])
        return model, model
    if name == "transformers":
        return build_transformers(args, device)
    raise SystemExit(f"unknown variant {name!r}")


# ----------------------------------------------------------------------------------------------- timing


def one_step(model, forward, ids, valid, device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one forward+backward."""
    with stopwatch(torch.cuda.synchronize if device == "cuda" else None) as t:
        forward(ids, valid).float().sum().backward()
    for p in model.parameters():
        p.grad = None
    return t.wall, t.cpu


def profile(model, forward, ids, valid, device, name):
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=activities, record_shapes=False) as prof:
        one_step(model, forward, ids, valid, device)
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(f"\n### profile: {name}\n")
    print(prof.key_averages().table(sort_by=key, row_limit=25))


def main(argv=None):
    args = parse_args(argv)
    args.malloc = "glibc default"
    if args.device == "cpu" and args.keep_freed_memory and keep_freed_memory():
        args.malloc = "glibc, freed memory kept (M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1)"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs CUDA")
    if args.device == "cpu" and args.dtype != "fp32":
        print("note: bf16 on CPU is very slow (no fast kernels); the issue asks for fp32 on CPU")

    from megarank.parallel.init import init_distributed

    init_distributed(tp=1, pp=1)  # megarank's layers need megatron's parallel state (one in-process rank)
    env = environment()
    print(header(env), flush=True)
    ids, valid = make_batch(args, args.device)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    models = {name: build(name, args, args.device) for name in names}
    params = {name: sum(p.numel() for p in m.parameters()) for name, (m, _) in models.items()}
    args.non_embedding_params = sum(params.values()) / len(params) - args.vocab * args.hidden

    if args.profile:
        model, forward = models[args.profile]
        for _ in range(max(1, args.warmup)):
            one_step(model, forward, ids, valid, args.device)
        profile(model, forward, ids, valid, args.device, args.profile)
        return

    for name, (model, forward) in models.items():
        for _ in range(args.warmup):
            one_step(model, forward, ids, valid, args.device)
    times = {name: [] for name in names}
    cpu_times = {name: [] for name in names}
    peak = {}
    for _ in range(args.iters):
        for name, (model, forward) in models.items():
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            wall, cpu = one_step(model, forward, ids, valid, args.device)
            times[name].append(wall)
            cpu_times[name].append(cpu)
            if args.device == "cuda":
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated())

    report(args, env, names, params, times, cpu_times, peak)


def report(args, env, names, params, times, cpu_times, peak):
    wall = {n: summary(t) for n, t in times.items()}
    cpu = {n: summary(t) for n, t in cpu_times.items()}
    ref = wall.get("transformers")
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"\nforward+backward, {args.layers} layers, hidden {args.hidden}, {args.heads} heads / {args.kv_heads} kv heads, "
        f"ffn {args.ffn} ({args.non_embedding_params / 1e6:.1f}M params without the embedding), vocab {args.vocab}, "
        f"seq {args.seq}, batch {args.batch} ({args.pad_fraction:.0%} of rows padded to 3/4), {args.dtype}, {device}, "
        f"allocator: {args.malloc}; median of {args.iters} after {args.warmup} warm-up; load average at the end "
        f"{load_average()}\n"
    )
    mem_col = " peak mem (GiB) |" if peak else ""
    print(f"| variant | params (M) | step (s), median | min (s) | max (s) | CPU time (s), median | ratio transformers/variant (median) | ratio (min) |{mem_col}")
    print("|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if peak else ""))
    rows = []
    for n in names:
        ratio = ref["median"] / wall[n]["median"] if ref else float("nan")
        ratio_min = ref["min"] / wall[n]["min"] if ref else float("nan")
        mem = f" {peak[n] / 2**30:.2f} |" if peak else ""
        print(f"| {n} | {params[n] / 1e6:.1f} | {wall[n]['median']:.3f} | {wall[n]['min']:.3f} | {wall[n]['max']:.3f} | "
              f"{cpu[n]['median']:.3f} | {ratio:.2f} | {ratio_min:.2f} |{mem}")
        rows.append({"variant": n, "params": params[n], "median_s": wall[n]["median"], "wall_s": wall[n],
                     "cpu_s": cpu[n], "times_s": times[n], "cpu_times_s": cpu_times[n], "ratio": ratio,
                     "ratio_min": ratio_min, "peak_bytes": peak.get(n)})
    if args.json:
        write_json(args.json, {"args": vars(args), "device": device, "rows": rows}, env)

if __name__ == "__main__":  # the guard matters: megatron's dist-checkpoint code spawns helper processes
    main()
