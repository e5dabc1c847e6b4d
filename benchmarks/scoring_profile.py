"""Why scoring (no-grad forward) reaches a smaller share of the fp32 GEMM peak than a training step (issue 11).

    python benchmarks/scoring_profile.py                         # SmolLM2-135M shape, 30 layers, 1 thread
    python benchmarks/scoring_profile.py --layers 6 --pairs 16 --repeats 5 --hypotheses --profile

Model: SmolLM2-135M's shape (30 layers, hidden 576, 9 heads / 3 KV heads, ffn 1536, vocab 49152), random weights,
megarank's local spec (SDPA), TP=1, one in-process gloo rank (benchmarks/common.py's ``build_megarank``). Batches:
``megarank rerank``'s own (``Batcher.scoring_batches``: length-sorted, padded to a multiple of 8) of SciFact-train BM25
top-100 pairs through SmolLM2's tokenizer when the data and the converted cache exist, else random ids with
lengths spread like SciFact's (350-600 tokens, sorted). ``--batches`` batches are taken from the middle of the
sorted stream.

Variants, interleaved (every repeat runs each variant once, on every batch) so load drift hits all alike:
  score-baseline   no_grad forward, model code as before issue 11 (megatron's RoPE, composite RMSNorm, SwiGLU
                   without the in-place product): the reference
  score            no_grad forward, today's model code (what ``megarank rerank`` runs)
  score-schedule   the same through megatron's forward_backward_func in forward-only mode, as ``megarank rerank``
                   scores (megarank.scoring.batched.score_batches, one rank)
  score-inference  the same forward under torch.inference_mode
  score-packed     the batch packed (megarank.data.packing, per-sequence attention)
  score-small / train-baseline / train
                   the first ``--train-pairs`` rows of each batch: no_grad forward, and forward+backward (sum of
                   scores) with the baseline and today's code. Same tokens, so forward and training compare directly.
GEMM FLOPs are counted by torch.utils.flop_counter.FlopCounterMode (aten.mm: the linears) and the attention
matmuls analytically (4·b·s²·heads·head_dim forward over the padded shape; ×3 with backward); % of peak =
FLOP/s over the 1024³ fp32 GEMM rate measured with the same clock and threads (megarank.hardware's
``peak_flops`` is printed too; it uses wall time).

Clock: on a shared 2-core machine wall time measures the other jobs as much as this one. ``--clock cpu``
(default) times process CPU time with ``--threads 1``: one thread cannot wait on a descheduled sibling, so its
CPU time is the work done, whatever the load. ``--clock wall`` for a quiet machine. glibc keeps freed memory
(common.keep_freed_memory) so steps do not page-fault their activations in again; ``--malloc
default`` leaves glibc as `megarank rerank` has it (page faults are system CPU time, which ``--clock cpu`` counts).
``--hypotheses`` adds per-op micro-benchmarks (SDPA mask variants, GEMM shapes forward vs backward, RoPE,
RMSNorm, SwiGLU); ``--profile`` prints torch.profiler's top ops (self CPU) of one no-grad forward, baseline
and today's; ``--compile`` measures torch.compile (dynamic shapes) of the scoring forward and a training step.
"""
from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from common import (SMOLLM2_CACHE, build_megarank, environment, find_beir, header, keep_freed_memory, load_average,
                    stopwatch, summary, write_json)

SMOLLM2 = dict(layers=30, hidden=576, heads=9, kv_heads=3, ffn=1536, vocab=49152)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=SMOLLM2["layers"])
    p.add_argument("--pairs", type=int, default=32, help="pairs per scoring batch (megarank's eval_batch_size)")
    p.add_argument("--train-pairs", type=int, default=8, help="rows of each batch for the forward-vs-training pair")
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    p.add_argument("--malloc", choices=["keep", "default"], default="keep",
                   help="keep: glibc keeps freed memory (no page faults on re-allocation); default: glibc as is, "
                   "as `megarank rerank` runs (run both, in two processes, to see what page faults cost)")
    p.add_argument("--data", default=None, help="BEIR folder with candidates/ (default SciFact-train; 'synthetic')")
    p.add_argument("--variants", default="score-baseline,score,score-schedule,score-inference,score-packed,"
                   "score-small,train-baseline,train")
    p.add_argument("--hypotheses", action="store_true")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-pairs", type=int, default=1000, help="pairs of the rerank the compile time is spread over")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ clock


def timed(fn, clk: str) -> float:
    """Seconds of ``fn()`` by ``clk``: "cpu" (this process's CPU time) or "wall"."""
    with stopwatch() as t:
        fn()
    return getattr(t, clk)


def best_rate(fn, flops: float, clk, seconds: float = 1.0) -> float:
    fn()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        best = max(best, flops / max(timed(fn, clk), 1e-9))
    return best


# ------------------------------------------------------------------------------------------------ batches


def scoring_batches(args) -> tuple[list, str]:
    """Padded scoring batches from the middle of megarank's length-sorted stream, and where they come from."""
    from megarank.data import Batcher, candidate_pairs, find_run_file, read_beir, read_run

    if args.data != "synthetic" and (SMOLLM2_CACHE / "tokenizer.json").exists():
        try:
            data = find_beir(args.data)
        except SystemExit:
            data = None
        if data is not None:
            from megarank.data.tokenizer import PairTokenizer, load_tokenizer

            tok = PairTokenizer(load_tokenizer(str(SMOLLM2_CACHE)), max_length=512, pad_to_multiple_of=8)
            beir = read_beir(data, "train")
            run = read_run(find_run_file(data, "train"))
            qids = [q for q in run if q in beir.queries][:20]
            pairs = candidate_pairs(beir.queries, beir.corpus, {q: run[q] for q in qids}, 100)
            stream = [b for _, b in Batcher(tok).scoring_batches(pairs, beir.queries, beir.corpus, batch_size=args.pairs)]
            mid = len(stream) // 2 - args.batches // 2
            return stream[mid:mid + args.batches], f"{data.name}: {len(qids)} queries x BM25 top-100, SmolLM2 tokenizer"
    g = torch.Generator().manual_seed(0)
    lengths = sorted(torch.randint(350, 601, (args.pairs * args.batches,), generator=g).tolist(), reverse=True)
    out = []
    for k in range(args.batches):
        rows = lengths[k * args.pairs:(k + 1) * args.pairs]
        seq = -(-max(rows) // 8) * 8
        ids = torch.randint(3, SMOLLM2["vocab"], (len(rows), seq), generator=g)
        valid = torch.arange(seq)[None, :] < torch.tensor(rows)[:, None]
        ids[~valid] = 2
        out.append({"input_ids": ids, "attention_mask": valid})
    return out, "synthetic ids, lengths uniform in 350-600, sorted"


def head_rows(batch, n: int) -> dict:
    return {"input_ids": batch["input_ids"][:n], "attention_mask": batch["attention_mask"][:n]}


# ------------------------------------------------------------------------------------------------ baseline code


class BaselineCode:
    """Swap the model code back to what it was before issue 11 (and back again), on a built model.

    The pre-issue-11 forms, kept here verbatim: megatron's own RoPE (``use_core_rope(False)``), the composite
    RMSNorm formula, and SwiGLU's forward without the no-grad in-place product.
    """

    def __init__(self, model):
        from megarank.model import mlp, norm

        self.model, self.norm, self.mlp = model, norm, mlp
        self.fast_norm, self.fast_swiglu = norm.RMSNorm.forward, mlp.SwiGLU.forward

    @staticmethod
    def _norm_forward(self, x):
        from megarank.model.norm import reference_rms_norm

        return reference_rms_norm(x, self.weight, self.eps)

    @staticmethod
    def _swiglu_forward(ctx, x):
        gate, up = x.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(x, act)
        return act * up

    def set(self, baseline: bool) -> None:
        self.model.use_core_rope(not baseline)
        self.norm.RMSNorm.forward = self._norm_forward if baseline else self.fast_norm
        self.mlp.SwiGLU.forward = staticmethod(self._swiglu_forward) if baseline else staticmethod(self.fast_swiglu)


# ------------------------------------------------------------------------------------------------ variants


def attention_flops(batch, cfg, backward: bool) -> float:
    """Attention matmul FLOPs (QK^T and PV) over the padded shape (packed: per sequence), all layers."""
    if "packed_seq_params" in batch:
        sq = sum(n * n for n in batch["packed_seq_params"].seqlens)
    else:
        b, s = batch["input_ids"].shape
        sq = b * s * s
    fwd = 4 * sq * cfg.num_attention_heads * cfg.kv_channels * cfg.num_layers
    return fwd * (3 if backward else 1)


def make_variants(model, baseline: BaselineCode):
    from megarank.scoring.batched import score_batches
    from megarank.model.inputs import model_inputs

    def score(batch, mode=torch.no_grad):
        model.eval()
        args, kwargs = model_inputs(batch, "cpu")
        with mode():
            return model(*args, **kwargs)

    def train(batch):
        model.train()
        args, kwargs = model_inputs(batch, "cpu")
        model(*args, **kwargs).float().sum().backward()
        for p in model.parameters():
            p.grad = None
        model.eval()

    def schedule(batch):  # score_batches: no_grad, eval mode, one rank here; the pairs only name the scores
        score_batches(model, [([("q", str(i)) for i in range(len(batch["input_ids"]))], batch)])

    def with_code(fn, base: bool):
        def run(batch):
            baseline.set(base)
            try:
                return fn(batch)
            finally:
                baseline.set(False)
        return run

    return {
        "score-baseline": (with_code(score, True), "full", False),
        "score": (score, "full", False),
        "score-schedule": (schedule, "full", False),
        "score-inference": (lambda b: score(b, torch.inference_mode), "full", False),
        "score-packed": (score, "packed", False),
        "score-small": (score, "small", False),
        "train-baseline": (with_code(train, True), "small", True),
        "train": (train, "small", True),
    }


def count_mm_flops(fn, batch) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn(batch)
    return float(counter.get_total_flops())


# ------------------------------------------------------------------------------------------------ hypotheses


def hypotheses(args, clk, batch, cfg) -> list:
    """Per-op micro-benchmarks at the shapes of one scoring batch: (what, ms or GFLOP/s, note)."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    from megarank.model.attention import rope_rotate
    from megarank.model.norm import reference_rms_norm

    b, s = batch["input_ids"].shape
    lengths = batch["attention_mask"].sum(1).tolist()
    h, n, g, d, ffn = cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels, cfg.ffn_hidden_size
    rows = []

    def ms(fn, reps=5):
        fn()
        return 1e3 * min(timed(fn, clk) for _ in range(reps))

    torch.manual_seed(0)
    q, k, v = torch.randn(s, b, n, d), torch.randn(s, b, g, d), torch.randn(s, b, g, d)
    qp, kp, vp = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    keep = (torch.arange(s)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]
    additive = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    sdpa = F.scaled_dot_product_attention
    with torch.no_grad():
        variants = {
            "SDPA [s,b]-permuted q/k/v + bool mask (today)": lambda: sdpa(qp, kp, vp, attn_mask=keep, enable_gqa=True),
            "SDPA permuted, no mask": lambda: sdpa(qp, kp, vp, enable_gqa=True),
            "SDPA permuted, additive float mask": lambda: sdpa(qp, kp, vp, attn_mask=additive, enable_gqa=True),
            "SDPA contiguous [b,n,s,d] + bool mask": lambda: sdpa(qp.contiguous(), kp.contiguous(), vp.contiguous(),
                                                                   attn_mask=keep, enable_gqa=True),
            "SDPA keys repeated to 9 heads + bool mask": lambda: sdpa(qp, kp.repeat_interleave(n // g, 1),
                                                                        vp.repeat_interleave(n // g, 1), attn_mask=keep),
            "SDPA one call per sequence, unpadded": lambda: [sdpa(qp[i:i + 1, :, :L], kp[i:i + 1, :, :L], vp[i:i + 1, :, :L],
                                                                  enable_gqa=True) for i, L in enumerate(lengths)],
        }
        for name, fn in variants.items():
            rows.append((f"{name} (one layer)", f"{ms(fn):.1f} ms", ""))

        x = torch.randn(s, b, h)
        w = torch.ones(h)
        rows.append(("RMSNorm composite formula (before)", f"{ms(lambda: reference_rms_norm(x, w, 1e-5)):.2f} ms", f"[{s},{b},{h}]"))
        rows.append(("RMSNorm F.rms_norm (now)", f"{ms(lambda: F.rms_norm(x, (h,), w, 1e-5)):.2f} ms", "bit-identical"))
        freqs = torch.randn(s, 1, 1, d // 2)
        emb, cos, sin = torch.cat((freqs, freqs), -1), torch.cos(freqs), torch.sin(freqs)
        rows.append(("RoPE megatron apply_rotary_pos_emb (unfused), q (before)", f"{ms(lambda: apply_rotary_pos_emb(q, emb, cfg)):.2f} ms", ""))
        rows.append(("RoPE RotateHalf in core attention, q (now)", f"{ms(lambda: rope_rotate(q, cos, sin)):.2f} ms", "bit-identical"))
        up = torch.randn(s, b, 2 * ffn)
        rows.append(("SwiGLU silu(gate) * up (before)", f"{ms(lambda: F.silu(up[..., :ffn]) * up[..., ffn:]):.2f} ms", ""))
        rows.append(("SwiGLU silu(gate).mul_(up) (now, no grad)", f"{ms(lambda: F.silu(up[..., :ffn]).mul_(up[..., ffn:])):.2f} ms", ""))
        rows.append(("one elementwise add of [s,b,h]", f"{ms(lambda: x + x):.2f} ms", "memory-bound reference"))

        m = b * s
        for name, kk, nn in (("qkv", h, (n + 2 * g) * d), ("proj", n * d, h), ("fc1", h, 2 * ffn), ("fc2", ffn, h)):
            a, wt, gr = torch.randn(m, kk), torch.randn(nn, kk), torch.randn(m, nn)
            flops = 2 * m * kk * nn
            fw = best_rate(lambda: F.linear(a, wt), flops, clk, 0.5) / 1e9
            dg = best_rate(lambda: gr @ wt, flops, clk, 0.5) / 1e9
            wg = best_rate(lambda: gr.t() @ a, flops, clk, 0.5) / 1e9
            rows.append((f"GEMM {name} [{m}x{kk}]x[{kk}x{nn}]", f"fwd {fw:.0f} / dgrad {dg:.0f} / wgrad {wg:.0f} GFLOP/s",
                         "forward GEMMs have K = hidden; weight gradients K = tokens"))
    return rows


# ------------------------------------------------------------------------------------------------ compile


def compile_study(args, model, batches, cfg, clk) -> list:
    """torch.compile(dynamic=True) of the scoring forward and of a training step: compile time, recompiles,
    steady-state ratio to eager, and the break-even for a rerank of ``--compile-pairs`` pairs."""
    import torch._dynamo as dynamo

    from megarank.model.inputs import model_inputs

    rows = []
    dynamo.reset()
    dynamo.config.cache_size_limit = 64
    compiled = torch.compile(model, dynamic=True)
    shapes = [batches[0], *(head_rows(b, max(1, len(b["input_ids"]) - 3)) for b in batches)]

    def fwd(m, batch):
        args_, kwargs = model_inputs(batch, "cpu")
        with torch.no_grad():
            return m(*args_, **kwargs)

    model.eval()
    wall0 = time.perf_counter()
    fwd(compiled, shapes[0])
    compile_s = time.perf_counter() - wall0
    counters = dynamo.utils.counters
    t_new_shapes = [timed(lambda: fwd(compiled, b), "wall") for b in shapes[1:]]
    frames = sum(counters["stats"].values()) if "stats" in counters else 0
    eager, comp = [], []
    for _ in range(args.repeats):
        for batch in batches:
            eager.append(timed(lambda: fwd(model, batch), clk))
            comp.append(timed(lambda: fwd(compiled, batch), clk))
    scores_e, scores_c = fwd(model, batches[0]), fwd(compiled, batches[0])
    diff = (scores_e - scores_c).abs().max().item()
    e, c = summary(eager)["median"], summary(comp)["median"]
    per_pair_saving = (e - c) / args.pairs
    rerank = args.compile_pairs * e / args.pairs
    rows.append({"what": "score forward", "first_call_wall_s": compile_s, "new_shape_calls_wall_s": t_new_shapes,
                 "eager_s": e, "compiled_s": c, "speedup": e / c, "max_score_diff": diff,
                 "recompiles": dict(counters.get("recompiles", {})), "frames": frames,
                 "rerank_pairs": args.compile_pairs, "rerank_eager_s": rerank,
                 "rerank_compiled_s": compile_s + sum(t_new_shapes) + args.compile_pairs * c / args.pairs,
                 "break_even_pairs": (compile_s / per_pair_saving) if per_pair_saving > 0 else float("inf")})

    small = head_rows(batches[0], args.train_pairs)

    def step(m):
        model.train()
        args_, kwargs = model_inputs(small, "cpu")
        m(*args_, **kwargs).float().sum().backward()
        for p in model.parameters():
            p.grad = None
        model.eval()

    wall0 = time.perf_counter()
    step(compiled)
    compile_train = time.perf_counter() - wall0
    eager, comp = [], []
    for _ in range(args.repeats):
        eager.append(timed(lambda: step(model), clk))
        comp.append(timed(lambda: step(compiled), clk))
    e, c = summary(eager)["median"], summary(comp)["median"]
    rows.append({"what": "training step", "first_call_wall_s": compile_train, "eager_s": e, "compiled_s": c,
                 "speedup": e / c})
    dynamo.reset()
    return rows


# ------------------------------------------------------------------------------------------------ main


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    malloc = keep_freed_memory() if args.malloc == "keep" else False
    clk = args.clock
    from megarank.data.packing import pack_padded
    from megarank.hardware import peak_flops
    from megarank.parallel.init import init_distributed

    init_distributed(tp=1, pp=1)
    shape = SimpleNamespace(**{**SMOLLM2, "layers": args.layers}, dtype="fp32")
    model = build_megarank(shape, "sdpa")
    model.eval()
    cfg = model.config
    baseline = BaselineCode(model)
    batches, source = scoring_batches(args)
    env = environment()
    a = torch.randn(1024, 1024)
    peak = best_rate(lambda: a @ a, 2 * 1024**3, clk, 1.5)
    lib_peak, lib_where = peak_flops("fp32")
    print(f"{header(env)}; clock {args.clock}; "
          f"allocator {'glibc, freed memory kept' if malloc else 'glibc default'}")
    print(f"model: SmolLM2-135M shape, {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads}/"
          f"{cfg.num_query_groups} heads, ffn {cfg.ffn_hidden_size}, fp32, local spec (SDPA), random weights")
    print(f"batches: {source}; " + ", ".join(
        f"{tuple(b['input_ids'].shape)} ({int(b['attention_mask'].sum())} real tokens)" for b in batches))
    print(f"fp32 GEMM peak (1024^3, this clock, {args.threads} thread(s)): {peak / 1e9:.1f} GFLOP/s; "
          f"megarank.hardware.peak_flops: {lib_peak / 1e9:.1f} GFLOP/s ({lib_where}, wall)\n")

    inputs = {
        "full": batches,
        "packed": [pack_padded(b, 2, 8) for b in batches],
        "small": [head_rows(b, args.train_pairs) for b in batches],
    }
    variants = make_variants(model, baseline)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    flops = {}
    for name in names:
        fn, kind, backward = variants[name]
        mm = sum(count_mm_flops(fn, b) for b in inputs[kind])
        attn = sum(attention_flops(b, cfg, backward) for b in inputs[kind])
        flops[name] = (mm, attn)
    times = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            fn, kind, _ = variants[name]
            times[name].append(sum(timed(lambda: fn(b), clk) for b in inputs[kind]))
    load_end = load_average()

    print("| variant | tokens (padded) | GEMM GFLOP (linears) | + attention GFLOP | time (s), median | min | max | "
          "linear-GEMM % of peak | all-matmul % of peak | ratio to score-baseline |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    stats = {name: summary(t) for name, t in times.items()}
    base = stats["score-baseline"]["median"] if "score-baseline" in stats else None
    train_base = stats["train-baseline"]["median"] if "train-baseline" in stats else None
    for name in names:
        fn, kind, backward = variants[name]
        t = stats[name]["median"]
        mm, attn = flops[name]
        tokens = sum(b["input_ids"].numel() for b in inputs[kind])
        ref = train_base if name.startswith("train") else (base if kind == "full" or kind == "packed" else None)
        ratio = f"{ref / t:.2f}" if ref else ""
        print(f"| {name} | {tokens} | {mm / 1e9:.1f} | {attn / 1e9:.1f} | {t:.3f} | {stats[name]['min']:.3f} | "
              f"{stats[name]['max']:.3f} | {100 * mm / t / peak:.1f}% | {100 * (mm + attn) / t / peak:.1f}% | {ratio} |")
        rows.append({"variant": name, "tokens": tokens, "mm_flops": mm, "attn_flops": attn, "times_s": times[name],
                     "median_s": t, "stats_s": stats[name], "gemm_pct": 100 * mm / t / peak,
                     "matmul_pct": 100 * (mm + attn) / t / peak})
    res = __import__("resource").getrusage(__import__("resource").RUSAGE_SELF)
    print(f"\npage faults so far: {res.ru_minflt} minor, {res.ru_majflt} major; system CPU {res.ru_stime:.1f} s, user {res.ru_utime:.1f} s")
    print(f"load average {load_end} at the end; median of {args.repeats} interleaved repeats, each the sum over "
          f"{len(batches)} batches; train-* ratios are to train-baseline, score-* to score-baseline")

    result = {"threads": args.threads, "clock": args.clock, "load": [env["load_average"], load_end],
              "peak_flops": peak, "lib_peak_flops": lib_peak, "source": source, "rows": rows}
    if args.hypotheses:
        print("\n### per-op micro-benchmarks (one layer's shapes of the first batch; best of 5)\n")
        print("| what | time | note |\n|---|---:|---|")
        hyp = hypotheses(args, clk, batches[0], cfg)
        for what, value, note in hyp:
            print(f"| {what} | {value} | {note} |")
        result["hypotheses"] = hyp
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        score = variants["score"][0]
        for label, base_code in (("baseline code", True), ("today's code", False)):
            baseline.set(base_code)
            score(batches[0])
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                score(batches[0])
            baseline.set(False)
            print(f"\n### torch.profiler, one no-grad forward of {tuple(batches[0]['input_ids'].shape)}, {label}\n")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    if args.compile:
        rows_c = compile_study(args, model, batches, cfg, clk)
        print("\n### torch.compile(dynamic=True)\n")
        for r in rows_c:
            print(json.dumps(r))
        result["compile"] = rows_c
    if args.json:
        write_json(args.json, result, env)


if __name__ == "__main__":
    main()
