"""Python parts of ``benchmarks/gpu_check.sh`` (see docs/gpu.md): the environment table and the CUDA-vs-CPU
numerics check. Each command prints a Markdown fragment for the report on stdout.

    python benchmarks/gpu_check.py env
    python benchmarks/gpu_check.py numerics --work DIR [--dry-run]

``numerics`` builds megarank's reranker with the local spec (SmolLM2-135M's shape, random weights; the tiny
shape with ``--dry-run``), saves its fp32 weights as a megarank checkpoint, runs forward + listwise loss +
backward on this process's device in fp32 and in bf16, then loads the same checkpoint in a child process with
CUDA hidden (so megarank's CPU shims are active) and runs the same batch in fp32 on the CPU. It reports the score
difference and the worst per-parameter gradient cosine of each device run against the CPU run, and exits 1 when
a difference is above its bound.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from common import REPO, environment, package_version

# SmolLM2-135M's architecture (HF config of HuggingFaceTB/SmolLM2-135M: 30 layers, hidden 576, 9 heads / 3 KV
# heads, intermediate 1536, vocab 49152, rope_theta 100000, no rope scaling). Random weights: only numerics
# are compared here, so no download is needed.
SMOLLM2_SHAPE = [
    "model.num_layers=30", "model.hidden_size=576", "model.num_attention_heads=9", "model.num_query_groups=3",
    "model.ffn_hidden_size=1536", "model.vocab_size=49152", "model.make_vocab_size_divisible_by=128",
    "model.rope_theta=100000.0", "model.rope_scaling=null", "model.norm_eps=1e-5",
]
TINY_SHAPE = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
    "model.ffn_hidden_size=128", "model.vocab_size=259", "model.make_vocab_size_divisible_by=64",
]
GROUP = 4  # rows per listwise group in the numerics batch
# Bounds: fp32 on the GPU differs from the CPU only by summation order; bf16 by rounding of every activation.
BOUNDS = {"fp32": {"score_rel": 1e-3, "grad_cos": 0.9999}, "bf16": {"score_rel": 5e-2, "grad_cos": 0.99}}


def _nccl_version() -> str:
    import torch

    try:
        v = torch.cuda.nccl.version()  # a tuple in recent torch, an int in older releases
    except Exception as e:  # noqa: BLE001 - a report line, not a failure
        return f"unknown ({type(e).__name__})"
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def cmd_env(_args) -> int:
    import torch

    env = environment()
    rows = [("date", env["date"]), ("git commit", env["git_commit"]),
            ("CPU", f"{env['cpu']}, {env['logical_cpus']} logical CPUs, {env['ram_gib']:g} GiB RAM"),
            ("matmul ISA", env["matmul_isa"]), ("python", env["python"]), ("torch", env["torch"]),
            ("torch CUDA build", str(torch.version.cuda)), ("CUDA available", str(torch.cuda.is_available()))]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        rows += [("GPU", f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
                         f"compute capability {p.major}.{p.minor}"),
                 ("NCCL", _nccl_version())]
    te = importlib.util.find_spec("transformer_engine") is not None
    rows += [("Transformer Engine importable", str(te))]
    for pkg in ("transformer-engine", "megatron-core", "transformers", "sentence-transformers", "ir-measures",
                "pytrec-eval-terrier", "gguf", "megarank"):
        rows.append((pkg, package_version(pkg)))
    print("| what | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    return 0


# ----------------------------------------------------------------------------------------------- numerics


def _overrides(dry_run: bool, dtype: str) -> list[str]:
    return [*(TINY_SHAPE if dry_run else SMOLLM2_SHAPE), f"model.dtype={dtype}", "model.transformer_impl=local",
            "model.attention_dropout=0.0", "model.hidden_dropout=0.0"]


def _batch(dry_run: bool, vocab: int):
    """8 rows (2 listwise groups of 4) of right-padded random ids with varied lengths; [b, s] and [b, s] bool."""
    import torch

    rows, seq = (4, 16) if dry_run else (8, 128)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (rows, seq), generator=g)
    lengths = torch.tensor([seq, seq - 3, seq // 2, seq // 4 + 1, seq, seq - 7, seq // 3, 5][:rows])
    valid = torch.arange(seq)[None, :] < lengths[:, None]
    return ids, valid


def _load(work: Path, dry_run: bool, dtype: str):
    """The numerics checkpoint in ``dtype`` (the fp32 weights cast on load), through megarank's Python API."""
    from megarank import Reranker

    return Reranker.from_checkpoint(work / "ckpt", dtype=dtype, overrides=_overrides(dry_run, dtype)).model


def _forward_backward(model, ids, valid) -> dict:
    """Scores, listwise loss and every parameter's gradient (as fp32 CPU tensors)."""
    from megarank.parallel.init import device
    import torch

    from megarank.training.loss import group_loss

    dev = device()
    model.train()
    model.zero_grad(set_to_none=True)
    scores = model(ids.to(dev), valid.to(dev))
    relevance = torch.zeros(scores.numel() // GROUP, GROUP, device=scores.device)
    relevance[:, 0] = 1.0
    loss = group_loss("listwise", scores, relevance)
    loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return {"scores": scores.detach().float().cpu().view(-1), "loss": loss.item(), "grads": grads}


def _compare(run: dict, ref: dict) -> dict:
    import torch

    diff = (run["scores"] - ref["scores"]).abs().max().item()
    scale = ref["scores"].abs().max().item()
    cosines = {}
    for name, g_ref in ref["grads"].items():
        g = run["grads"][name]
        cosines[name] = torch.nn.functional.cosine_similarity(g.view(1, -1).double(), g_ref.view(1, -1).double()).item()
    worst = min(cosines, key=cosines.get)
    return {"score_max_abs_diff": diff, "score_max_abs": scale, "score_rel": diff / max(scale, 1e-12),
            "loss_abs_diff": abs(run["loss"] - ref["loss"]), "grad_cos_min": cosines[worst], "grad_cos_min_param": worst,
            "n_params": len(cosines), "missing_grads": sorted(set(ref["grads"]) - set(run["grads"]))}


def cmd_numerics_cpu(args) -> int:
    """Child process: CUDA hidden, the same checkpoint and batch in fp32 on the CPU."""
    import torch

    assert not torch.cuda.is_available(), "the reference side must run without CUDA"
    work = Path(args.work)
    model = _load(work, args.dry_run, "fp32")
    batch = torch.load(work / "batch.pt")
    torch.save(_forward_backward(model, batch["ids"], batch["valid"]), work / "cpu.pt")
    return 0


def cmd_numerics(args) -> int:
    import torch
    import torch.distributed as dist

    from megarank import Reranker
    from megarank.checkpoint import save_model_weights, write_manifest
    from megarank.config import save_config

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    on_gpu = torch.cuda.is_available()
    if on_gpu:  # fp32 must mean fp32 on both sides (TF32 would change the GPU side's rounding)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    fresh = Reranker.from_config(None, _overrides(args.dry_run, "fp32") + ["train.seed=0"])  # random weights
    model, cfg = fresh.model, fresh.cfg
    backend = dist.get_backend()
    save_model_weights(model, work / "ckpt" / "model")
    save_config(cfg, work / "ckpt" / "config.yaml")  # a checkpoint folder that Reranker.from_checkpoint loads
    write_manifest(work / "ckpt")
    ids, valid = _batch(args.dry_run, cfg.model.vocab_size)
    torch.save({"ids": ids, "valid": valid}, work / "batch.pt")
    runs = {"fp32": _forward_backward(model, ids, valid)}
    del model, fresh
    model16 = _load(work, args.dry_run, "bf16")
    runs["bf16"] = _forward_backward(model16, ids, valid)
    del model16
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, str(Path(__file__).resolve()), "numerics-cpu", "--work", str(work)] + (["--dry-run"] if args.dry_run else [])
    subprocess.run(cmd, check=True, env=env, cwd=str(REPO))
    ref = torch.load(work / "cpu.pt")
    where = torch.cuda.get_device_name() if on_gpu else "CPU (no CUDA here: both sides on the CPU)"
    shape = "tiny (dry run)" if args.dry_run else "SmolLM2-135M shape, random weights"
    n_tokens = int(valid.sum())
    print(f"Local spec, {shape}; {ids.shape[0]} rows x {ids.shape[1]} positions ({n_tokens} real tokens), listwise loss "
          f"over groups of {GROUP}; device: {where}, torch.distributed backend `{backend}`; reference: the same "
          "checkpoint in fp32 on the CPU (child process, CUDA hidden, megarank's CPU shims).\n")
    print("| device run | max abs score diff | max abs score | relative | loss diff | min grad cosine (param) | bound | result |")
    print("|---|---:|---:|---:|---:|---|---|---|")
    failed = False
    results = {}
    for dtype, run in runs.items():
        c = _compare(run, ref)
        b = BOUNDS[dtype]
        ok = c["score_rel"] <= b["score_rel"] and c["grad_cos_min"] >= b["grad_cos"] and not c["missing_grads"]
        failed |= not ok
        results[dtype] = {**c, "ok": ok}
        print(f"| {dtype} | {c['score_max_abs_diff']:.3e} | {c['score_max_abs']:.3e} | {c['score_rel']:.2e} | "
              f"{c['loss_abs_diff']:.2e} | {c['grad_cos_min']:.6f} ({c['grad_cos_min_param']}) | "
              f"rel <= {b['score_rel']:g}, cos >= {b['grad_cos']:g} | {'ok' if ok else 'FAILED'} |")
    (work / "numerics.json").write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="versions and device as a Markdown table").set_defaults(fn=cmd_env)
    for name, fn in (("numerics", cmd_numerics), ("numerics-cpu", cmd_numerics_cpu)):
        s = sub.add_parser(name, help="CUDA vs CPU numerics on the same weights" if name == "numerics" else argparse.SUPPRESS)
        s.add_argument("--work", required=True, help="scratch folder (checkpoint, batch, results)")
        s.add_argument("--dry-run", action="store_true", help="tiny shape (CPU smoke test of this script)")
        s.set_defaults(fn=fn)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":  # the guard matters: megatron's torch_dist writer starts a helper process
    sys.exit(main())
