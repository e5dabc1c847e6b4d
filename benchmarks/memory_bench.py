"""The dry-run memory estimate (megarank/training/memory.py) against measurement on CPU (issue 18): a mid-size
model (SmolLM2-135M's shape, random weights, fp32, the local spec), full fine-tuning vs LoRA, at two lengths so
that the activation term shows.

Each (arm, length) runs in its own process, one rank, on one micro-batch of one query group (``--passages``
sequences of exactly ``length`` tokens, padded layout with every token real, so the micro-batch is
passages x length tokens). Plain ``torch.optim.AdamW`` on the parameters that train stands in for megatron's DDP +
distributed optimizer on one rank: the same bytes (an fp32 gradient per trained parameter, kept between steps as
DDP's buffer is, and Adam's two fp32 moments). Measured:

- states: RSS after a first (warm-up) step - RSS before the model was built: weights + gradients + Adam state
  (+ the adapters' and allocator's small change), against the estimate's weights + gradients + optimizer;
- saved: the bytes of the distinct storages the autograd graph of the second step's forward keeps (walked from
  the scores, parameters excluded): exactly what the formula's "stored activations" count;
- activation peak: the peak RSS (VmHWM, reset through /proc/self/clear_refs) during the second step's forward
  and backward - RSS before it, against the estimate's activations (stored + one layer's backward working set).

glibc is told to serve every allocation of 64 KiB or more with mmap (``MALLOC_MMAP_THRESHOLD_=65536``) so that
freed tensors leave the RSS at once and the RSS follows the live tensors.

    python benchmarks/memory_bench.py --lengths 128 512 --json /tmp/memory_bench.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, child_env, header, write_json  # noqa: E402

# SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M config.json): 134.5 M parameters.
SHAPE = ["model.num_layers=30", "model.hidden_size=576", "model.ffn_hidden_size=1536", "model.num_attention_heads=9",
         "model.num_query_groups=3", "model.kv_channels=64", "model.vocab_size=49152", "model.rope_theta=100000",
         "model.rope_scaling=null", "model.transformer_impl=local", "model.attention_backend=sdpa",
         "model.dtype=fp32", "data.packing=false", "data.pad_to_multiple_of=8", "train.micro_batch_size=1",
         "train.global_batch_size=1"]
LORA = ["model.lora_rank=16", "model.lora_alpha=32"]
GiB = 2**30


def bench_config(length: int, passages: int, lora: bool):
    from megarank.config import load_config

    return load_config(str(REPO / "configs" / "tiny.yaml"),
                       SHAPE + [f"data.max_length={length}", f"data.n_passages={passages}"] + (LORA if lora else []))


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def rss() -> int:
    return _status("VmRSS:")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def saved_bytes(output, exclude: set) -> int:
    """Bytes of the distinct storages the autograd graph behind ``output`` keeps for backward (storages in
    ``exclude``, the parameters', left out)."""
    import torch

    seen, stack, visited = {}, [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        tensors = []
        for attr in dir(node):
            if attr.startswith("_saved_"):
                value = getattr(node, attr)
                tensors += value if isinstance(value, (tuple, list)) else [value]
        try:  # custom autograd functions (SwiGLU, RoPE, megatron's linears) keep theirs in saved_tensors
            tensors += list(getattr(node, "saved_tensors", ()))
        except RuntimeError:
            pass
        for t in tensors:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage.data_ptr() not in exclude:
                    seen[storage.data_ptr()] = storage.nbytes()
        stack.extend(f for f, _ in node.next_functions)
    return sum(seen.values())


def child(arm: str, length: int, passages: int) -> dict:
    import torch
    import torch.nn.functional as F

    from megarank.model import build_model
    from megarank.parallel.init import init_distributed

    torch.manual_seed(0)
    cfg = bench_config(length, passages, arm == "lora")
    init_distributed(tp=1, pp=1)
    before = rss()
    model = build_model(cfg.model, cfg.parallel).train()
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-5)
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(1, cfg.model.vocab_size, (passages, length))
    valid = torch.ones(passages, length, dtype=torch.bool)
    target = torch.zeros(1, dtype=torch.long)

    def step(measure: bool) -> dict:
        out = {}
        reset_peak()
        start = rss()
        scores = model(ids, valid)
        if measure:
            out["saved"] = saved_bytes(scores, exclude)
        loss = F.cross_entropy(scores.float().view(1, -1), target)
        loss.backward()
        out["act_peak"] = _status("VmHWM:") - start
        del scores, loss
        reset_peak()
        start = rss()
        opt.step()
        opt.zero_grad(set_to_none=False)  # gradients stay allocated, as megatron DDP's buffer does
        out["optimizer_step_peak"] = _status("VmHWM:") - start
        return out

    step(False)
    states = rss() - before
    measured = step(True)
    return {"arm": arm, "length": length, "passages": passages, "states": states, **measured,
            "trained_params": sum(p.numel() for p in trained), "params": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    p.add_argument("--passages", type=int, default=5, help="sequences per micro-batch (one query group)")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--child", nargs=2, metavar=("ARM", "LENGTH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.passages)))
        return 0
    from megarank.training.memory import activations, estimate, layer_terms

    print(header())
    rows = []
    for arm in ("full", "lora"):
        for length in args.lengths:
            env = child_env(OMP_NUM_THREADS="2", MALLOC_MMAP_THRESHOLD_="65536")
            done = subprocess.run([sys.executable, __file__, "--passages", str(args.passages), "--child", arm,
                                   str(length)], env=env, cwd=REPO, capture_output=True, text=True)
            if done.returncode:
                print(done.stdout[-2000:], done.stderr[-4000:])
                return done.returncode
            r = json.loads(done.stdout.strip().splitlines()[-1])
            cfg = bench_config(length, args.passages, arm == "lora")
            e = estimate(cfg, data_parallel=1, lora=arm == "lora")
            a = activations(cfg, 1, arm == "lora")
            r.update(est_states=e.states, est_stored=a.stored, est_activations=a.total,
                     est_layer_bytes_per_token=sum(layer_terms(cfg, arm == "lora").values()))
            rows.append(r)
            print(f"{arm:>4} L={length:<5} tokens {args.passages * length:>5} | states: measured "
                  f"{r['states'] / GiB:.3f} GiB, estimated {e.states / GiB:.3f} | saved tensors {r['saved'] / GiB:.3f} "
                  f"GiB, estimated stored {a.stored / GiB:.3f} | activation peak {r['act_peak'] / GiB:.3f} GiB, "
                  f"estimated {a.total / GiB:.3f} | optimizer step peak {r['optimizer_step_peak'] / GiB:.3f} GiB",
                  flush=True)
    if args.json:
        write_json(args.json, {"passages": args.passages, "shape": SHAPE, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
