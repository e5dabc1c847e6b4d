"""Real tokens per second and MFU of a training forward+backward: megarank packed vs padded vs a `transformers` peer.

    python benchmarks/packing_bench.py                                  # SciFact-train, SmolLM2-135M shape, fp32
    python benchmarks/packing_bench.py --dtypes fp32,bf16 --groups 1 --micro-batches 3 --json /tmp/packing.json
    python benchmarks/packing_bench.py --variants padded,packed-bucket,packed   # the two packed attentions

The micro-batches are the trainer's own: megarank's BEIR group source (BM25 hard negatives, ``n_passages`` 5) and
pair tokenizer (SmolLM2's tokenizer from the converted cache, megarank's template, ``max_length`` 512) on
``--data`` (SciFact-train if present, else Cranfield), batched by ``megarank.data.batcher.Batcher`` as the
training loop does (padded, and packed from the same token ids), ``--groups`` query groups per micro-batch. The
model has SmolLM2-135M's shape (read from the cache's config.json; random weights: speed does not depend on them).

Variants, same process, same threads, same micro-batches, one model per (variant family, dtype):
  padded          megarank, each micro-batch right-padded to its longest pair (multiple of 8): data.packing=false
  packed          megarank, data.packing (the default): one stream of whole pairs, attention per sequence
  packed-bucket   the same stream, local attention in length buckets (optional)
  peer            `transformers`: the cross-encoder NeMo AutoModel trains (LlamaBidirectionalForSequenceClassification
                  from checkpoint_tools/hf_modeling, the class megarank exports and NeMo AutoModel's reads: LlamaModel
                  with is_causal=False, SDPA, mean pool over real tokens, linear head) holding megarank's weights
                  as `megatron-to-hf` exports them (its config.json, checkpoint_tools/keymap.py's tensor map; checked:
                  same scores), fed the padded micro-batch, i.e. padded to the longest pair rounded up to a multiple
                  of 8 as NeMo AutoModel's collator pads
One step = forward, megarank's listwise loss (softmax CE over each group, positive first), backward, grads
dropped. After a warm-up of every variant, the timed steps are interleaved (micro-batch k: every dtype, every
variant; then k+1 ...) so machine load hits all alike. Reported: real (non-padding) tokens / summed step
seconds, the ratio to padded and to the peer, step seconds (median, min, max), and MFU = model FLOPs of the real
tokens (megarank/training/flops.py) per second / this CPU's measured GEMM peak for the dtype (megarank/hardware.py).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common import (SMOLLM2_CACHE, environment, find_beir, header, keep_freed_memory, load_average, stopwatch, summary,
                    write_json)

VARIANTS = ("padded", "packed", "packed-bucket", "peer")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="BEIR folder with candidates/ (default: SciFact-train, else Cranfield)")
    p.add_argument("--model", default=str(SMOLLM2_CACHE),
                   help="HF folder whose config.json gives the shape and tokenizer")
    p.add_argument("--groups", default="1,2", help="query groups per micro-batch, comma-separated")
    p.add_argument("--micro-batches", type=int, default=4, help="timed micro-batches per --groups value")
    p.add_argument("--variants", default="padded,packed,peer", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--dtypes", default="fp32", help="comma-separated: fp32, bf16")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--layers", type=int, default=None, help="override the layer count (quick runs)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="glibc keeps freed memory in the process (benchmarks/common.py keep_freed_memory): no "
                        "page faults on re-allocated activations, which `megarank train` does not do")
    return p.parse_args(argv)


def hf_shape(args) -> dict:
    config = Path(args.model) / "config.json"
    if not config.is_file():
        raise SystemExit(f"{config} not found: build the SmolLM2 cache (scripts/build_smollm2_cache.py) or pass --model")
    hf = json.loads(config.read_text())
    hf["rope_theta"] = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    if args.layers:
        hf["num_hidden_layers"] = args.layers
    return hf


def make_config(args, data: Path, hf: dict, dtype: str):
    from megarank.config import load_config

    return load_config(None, [
        f"model.num_layers={hf['num_hidden_layers']}", f"model.hidden_size={hf['hidden_size']}",
        f"model.ffn_hidden_size={hf['intermediate_size']}", f"model.num_attention_heads={hf['num_attention_heads']}",
        f"model.num_query_groups={hf['num_key_value_heads']}", f"model.vocab_size={hf['vocab_size']}",
        f"model.rope_theta={hf['rope_theta']}", "model.rope_scaling=null", f"model.norm_eps={hf['rms_norm_eps']}",
        "model.transformer_impl=local", f"model.dtype={dtype}",
        "data.format=beir", f"data.train_path={data}", f"data.tokenizer={args.model}",
        f"data.max_length={args.max_length}", "data.n_passages=5", f"train.seed={args.seed}",
    ])


def micro_batches(cfg, groups_per_micro: int, count: int, seed: int) -> list[tuple[dict, dict]]:
    """``count`` training micro-batches of ``groups_per_micro`` groups, each as (padded, packed) (TP=1)."""
    from megarank.data.batcher import Batcher
    from megarank.training.data import make_group_source, make_pair_tokenizer

    tok = make_pair_tokenizer(cfg, cfg.data.tokenizer)
    source = make_group_source(cfg)
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed + groups_per_micro)).tolist()
    groups = [source.get(i, 0) for i in order[: count * groups_per_micro]]
    padded, packed = (Batcher(tok, packed=p).micro_batches(groups, micro_batch_size=groups_per_micro)
                      for p in (False, True))
    return list(zip(padded, packed))


# ----------------------------------------------------------------------------------------------- the peer


def global_tensors(model) -> dict:
    """{megatron key: global tensor} of a one-rank model: the keys and stacked ``[L, ...]`` layers its checkpoint's
    ``model/`` holds (megarank.checkpoint.weights.load_global_tensors, the other way round)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    from megarank.checkpoint.weights import model_sharded_state_dict

    out = {}
    for sh in model_sharded_state_dict(model).values():
        for sub in nested_values(sh.build()) if isinstance(sh, ShardedTensorFactory) else [sh]:
            p = sub.prepend_axis_num  # the layer axis: an index, then the tensor's own offsets
            box = (*sub.global_offset[:p], *(slice(o, o + n) for o, n in zip(sub.global_offset[p:], sub.data.shape)))
            out.setdefault(sub.key, sub.data.new_empty(sub.global_shape))[box] = sub.data.detach()
    return out


def build_peer(m, hf: dict, megarank_model, dtype):
    """The HF reranker `megatron-to-hf` exports for megarank's weights, built in memory: its config.json
    (checkpoint_tools.hf_config.export_config) and its tensors (checkpoint_tools.keymap's mappings, the training
    temperature folded into the head as the export does)."""
    from checkpoint_tools import keymap
    from checkpoint_tools.hf_config import export_config
    from checkpoint_tools.hf_modeling.configuration_llama_bidirec import LlamaBidirectionalConfig
    from checkpoint_tools.hf_modeling.modeling_llama_bidirec import LlamaBidirectionalForSequenceClassification

    config = LlamaBidirectionalConfig.from_dict(export_config(m, "fp32", {"pad_token_id": hf.get("pad_token_id")}),
                                                attn_implementation="sdpa")
    peer = LlamaBidirectionalForSequenceClassification(config)
    tensors, dims = global_tensors(megarank_model), keymap.Dims.of(m, folded_temperature=m.temperature)
    out = {}
    for mp in keymap.MAPPINGS:
        for i in range(dims.layers) if mp.per_layer else [None]:
            out.update(mp.to_hf(tensors[mp.megatron] if i is None else tensors[mp.megatron][i], dims, i))
    peer.load_state_dict(out, strict=True)
    return peer.to(dtype).train()


def check_same_scores(megarank_model, peer, batch, dtype) -> float:
    """Max |score difference| / max |score| of megarank (padded) and the peer on one micro-batch (eval, no grad)."""
    megarank_model.eval(), peer.eval()
    with torch.no_grad():
        ours = megarank_model(batch["input_ids"], batch["attention_mask"]).float()
        theirs = peer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long()).logits.float()
    megarank_model.train(), peer.train()
    rel = ((ours - theirs).abs().max() / ours.abs().max()).item()
    limit = 1e-4 if dtype == torch.float32 else 5e-2
    if not rel <= limit:
        raise SystemExit(f"the peer's scores differ from megarank's by {rel:.3g} (relative): not the same model")
    return rel


# ----------------------------------------------------------------------------------------------- timing


def step(forward, model, batch) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of forward + listwise loss + backward."""
    from megarank.training.loss import group_loss

    with stopwatch() as t:
        group_loss("listwise", forward(batch), batch["relevance"]).backward()
    for p in model.parameters():
        p.grad = None
    return t.wall, t.cpu


def variant_step(name: str, models: dict, padded: dict, packed: dict) -> tuple[float, float]:
    import megarank.model.attention as attention
    from megarank.model.inputs import model_inputs

    if name == "peer":
        peer = models["peer"]
        return step(lambda b: peer(input_ids=b["input_ids"], attention_mask=b["attention_mask"].long()).logits,
                    peer, padded)
    model = models["megarank"]

    def forward(b):
        args, kwargs = model_inputs(b, "cpu")
        return model(*args, **kwargs)

    attention.PACKED_ATTENTION = "bucket" if name == "packed-bucket" else "loop"
    return step(forward, model, padded if name == "padded" else packed)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory and not keep_freed_memory():
        raise SystemExit("--keep-freed-memory: mallopt failed (not glibc?)")
    from megarank.config import torch_dtype
    from megarank.hardware import peak_flops
    from megarank.model import build_model
    from megarank.parallel.init import init_distributed
    from megarank.training.flops import real_lengths, training_flops

    variants = args.variants.split(",")
    dtypes = args.dtypes.split(",")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; expected some of {', '.join(VARIANTS)}")
    init_distributed(tp=1, pp=1)
    data = find_beir(args.data)
    hf = hf_shape(args)
    env = environment()
    print(header(env) + ("; glibc keeps freed memory" if args.keep_freed_memory else ""), flush=True)
    models, peaks = {}, {}
    for dtype in dtypes:
        cfg = make_config(args, data, hf, dtype)
        torch.manual_seed(0)
        mg = build_model(cfg.model, cfg.parallel).train()
        models[dtype] = {"cfg": cfg, "megarank": mg}
        if "peer" in variants:
            models[dtype]["peer"] = build_peer(cfg.model, hf, mg, torch_dtype(dtype))
        peaks[dtype] = peak_flops(dtype, "cpu")
    m = models[dtypes[0]]["cfg"].model
    print(f"data {data}, model shape {args.model} ({m.num_layers} layers, hidden {m.hidden_size}), "
          f"max_length {args.max_length}, random weights; MFU peaks: "
          + ", ".join(f"{d} {p / 1e9:.0f} GFLOP/s ({src})" for d, (p, src) in peaks.items()) + "\n")
    table_header = ("| groups/micro | micro-batches | real tokens | padding in padded batches | dtype | variant | "
              "real tokens/s | ratio to padded | ratio to peer | MFU | real tokens per CPU-s | CPU-s ratio to padded "
              "| CPU-s ratio to peer |\n|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    table = []
    rows = []
    for g in [int(x) for x in args.groups.split(",")]:
        pairs = micro_batches(models[dtypes[0]]["cfg"], g, args.micro_batches + 1, args.seed)
        warm, timed = pairs[0], pairs[1:]
        check = {}
        for dtype in dtypes:
            if "peer" in variants:
                check[dtype] = check_same_scores(models[dtype]["megarank"], models[dtype]["peer"], warm[0], torch_dtype(dtype))
            for name in variants:
                variant_step(name, models[dtype], *warm)
            print(f"  warm-up {dtype} done", flush=True)
        times = {(d, v): [] for d in dtypes for v in variants}
        cpu = {(d, v): [] for d in dtypes for v in variants}
        for k, (padded, packed) in enumerate(timed):
            for dtype in dtypes:
                for name in variants:
                    wall, used = variant_step(name, models[dtype], padded, packed)
                    times[dtype, name].append(wall)
                    cpu[dtype, name].append(used)
                print(f"  micro-batch {k + 1}/{len(timed)} {dtype}: " + ", ".join(
                    f"{v} {times[dtype, v][-1]:.2f} s ({cpu[dtype, v][-1]:.2f} CPU-s)" for v in variants)
                    + f" (load {load_average()})", flush=True)
        real = sum(int(p["attention_mask"].sum()) for p, _ in timed)
        padded_tokens = sum(p["input_ids"].numel() for p, _ in timed)
        flops = sum(training_flops(m, real_lengths(p)) for p, _ in timed)
        for dtype in dtypes:
            rate = {v: real / sum(times[dtype, v]) for v in variants}
            cpu_rate = {v: real / sum(cpu[dtype, v]) for v in variants}

            def ratio(r, name, base):
                return f"{r[name] / r[base]:.2f}" if base in r else "-"

            for name in variants:
                mfu = flops / sum(times[dtype, name]) / peaks[dtype][0]
                table.append(f"| {g} | {len(timed)} | {real} | {1 - real / padded_tokens:.1%} | {dtype} | {name} | "
                             f"{rate[name]:.0f} | {ratio(rate, name, 'padded')} | {ratio(rate, name, 'peer')} | "
                             f"{100 * mfu:.1f}% | {cpu_rate[name]:.0f} | {ratio(cpu_rate, name, 'padded')} | "
                             f"{ratio(cpu_rate, name, 'peer')} |")
                rows.append({"groups": g, "dtype": dtype, "variant": name, "real_tokens": real,
                             "padded_tokens": padded_tokens, "model_flops": flops, "times_s": times[dtype, name],
                             "tokens_per_s": rate[name], "mfu": mfu, "step_s": summary(times[dtype, name]),
                             "cpu_s": cpu[dtype, name], "tokens_per_cpu_s": cpu_rate[name],
                             "peer_score_rel_diff": check.get(dtype)})
    load_end = load_average()
    print("\n" + table_header + "\n" + "\n".join(table))
    if check:
        print("\npeer vs megarank scores (first micro-batch, eval): max relative difference "
              + ", ".join(f"{d} {c:.1e}" for d, c in check.items()))
    print(f"load average {load_end} at the end")
    if args.json:
        write_json(args.json, {"peaks": peaks, "load": [env["load_average"], load_end], "rows": rows}, env)


if __name__ == "__main__":
    main()
