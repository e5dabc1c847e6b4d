"""Benchmark the checkpoint converters on synthetic Llama-3.2-1B- and Llama-3.1-8B-sized checkpoints.

For each size: write a random bf16 HF ``LlamaForCausalLM`` checkpoint (sharded safetensors + index, real dims and
vocabulary), then time ``hf-to-megatron`` and ``megatron-to-hf`` each in a fresh subprocess
(``python -m checkpoint_tools ...``) and read that child's peak RSS from ``os.wait4`` (the kernel's ru_maxrss of
exactly that process). Then check the round trip: every exported tensor equals the source one (streamed, one
tensor at a time). Disk need: about 3x the checkpoint (source, megatron, export); a size is skipped with a message
when the work dir lacks the space.

    python benchmarks/convert_bench.py                 # 1b, then 8b if the disk allows
    python benchmarks/convert_bench.py --sizes 1b --workdir /tmp/bench --report results.md --json results.json
    python benchmarks/convert_bench.py --sizes tiny    # a 2-layer toy: checks the benchmark itself in seconds
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import environment, header, write_json

SIZES = {
    # meta-llama/Llama-3.2-1B and meta-llama/Llama-3.1-8B config.json dims
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
               "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True,
               "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192}},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192}},
    # not a real model: the smallest Llama the converters take, to check the benchmark itself
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": False, "vocab_size": 512,
             "bos_token_id": 1, "eos_token_id": 2},
}
COMMON = {"vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": 128001,
              "model_type": "llama", "architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16"}


def hf_tensor_plan(cfg: dict) -> list:
    """(name, shape) of an HF LlamaForCausalLM checkpoint, in the usual order."""
    h, f, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    n, g, d, v = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"]
    plan = [("model.embed_tokens.weight", (v, h))]
    for i in range(L):
        p = f"model.layers.{i}."
        plan += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (n * d, h)),
                 (p + "self_attn.k_proj.weight", (g * d, h)), (p + "self_attn.v_proj.weight", (g * d, h)),
                 (p + "self_attn.o_proj.weight", (h, n * d)), (p + "post_attention_layernorm.weight", (h,)),
                 (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)), (p + "mlp.down_proj.weight", (h, f))]
    plan.append(("model.norm.weight", (h,)))
    if not cfg["tie_word_embeddings"]:
        plan.append(("lm_head.weight", (v, h)))
    return plan


def write_synthetic(folder: Path, size: str) -> int:
    """Random bf16 weights (normal(0, 0.02); norms around 1), 5 GB shards + index, streamed. Returns bytes."""
    from checkpoint_tools.hf_writer import Planned, write_sharded

    cfg = {**COMMON, **SIZES[size]}
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    planned = [Planned(n, s, torch.bfloat16) for n, s in hf_tensor_plan(cfg)]
    gen = torch.Generator().manual_seed(0)

    def tensors():
        for p in planned:
            t = torch.empty(p.shape, dtype=torch.bfloat16)
            if "norm" in p.name:
                t.normal_(1.0, 0.05, generator=gen)
            else:
                t.normal_(0.0, 0.02, generator=gen)
            yield p.name, t

    write_sharded(folder, planned, tensors(), 5 * 10**9)
    return sum(p.nbytes for p in planned)


def run_measured(cmd: list) -> dict:
    """Run cmd in a child process; wall time and that child's peak RSS (ru_maxrss) from wait4."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-3000:]}")
    summary = [line for line in output.splitlines() if line.startswith(("hf-to-megatron:", "megatron-to-hf:"))]
    return {"seconds": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss * 1024 / 2**30, 2),
            "summary": summary[-1] if summary else ""}


def check_round_trip(src: Path, out: Path) -> int:
    """Every exported tensor equals the source's (score.weight is new); streamed. Returns the tensors compared."""
    from checkpoint_tools.hf_reader import HFWeights

    a, b = HFWeights(src), HFWeights(out)
    assert "lm_head.weight" not in b.names()
    compared = 0
    for name in b.names():
        if name == "score.weight":
            continue
        if not torch.equal(a.get(name), b.get(name)):
            raise AssertionError(f"round trip changed {name}")
        compared += 1
    assert compared == len([n for n in a.names() if n.startswith("model.")])
    return compared


def bench(size: str, workdir: Path, check: bool) -> dict:
    src, mg, out = workdir / f"{size}-hf", workdir / f"{size}-megatron", workdir / f"{size}-export"
    t = time.perf_counter()
    nbytes = write_synthetic(src, size)
    print(f"[{size}] synthetic HF checkpoint: {nbytes / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s", flush=True)
    py = [sys.executable, "-m", "checkpoint_tools"]
    result = {"size": size, "hf_bytes": nbytes}
    result["hf_to_megatron"] = run_measured(py + ["hf-to-megatron", str(src), str(mg), "--quiet"])
    print(f"[{size}] hf-to-megatron {result['hf_to_megatron']}", flush=True)
    result["megatron_to_hf"] = run_measured(py + ["megatron-to-hf", str(mg), str(out), "--quiet"])
    print(f"[{size}] megatron-to-hf {result['megatron_to_hf']}", flush=True)
    if check:
        t = time.perf_counter()
        result["bit_exact_tensors"] = check_round_trip(src, out)
        print(f"[{size}] round trip bit-exact: {result['bit_exact_tensors']} tensors ({time.perf_counter() - t:.0f} s)", flush=True)
    for d in (src, mg, out):
        shutil.rmtree(d, ignore_errors=True)
    return result


def markdown(results: list, command: str, env: dict) -> str:
    lines = [
        "### Checkpoint conversion (benchmarks/convert_bench.py)",
        "",
        (f"Machine: {header(env)}. Synthetic random bf16 HF LlamaForCausalLM checkpoints with the real dims (5 GB "
         "safetensors shards). Each direction runs as its own process; peak RSS = that process's ru_maxrss."),
        "",
        f"Command: `{command}`",
        "",
        "| model | HF weights | hf-to-megatron time | peak RSS | megatron-to-hf time | peak RSS | round trip |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['size']} | skipped: {r['skipped']} | | | | | |")
            continue
        a, b = r["hf_to_megatron"], r["megatron_to_hf"]
        exact = f"bit-exact ({r['bit_exact_tensors']} tensors)" if "bit_exact_tensors" in r else "not checked"
        lines.append(f"| {r['size']} | {r['hf_bytes'] / 1e9:.2f} GB | {a['seconds']} s | {a['peak_rss_gib']} GiB | "
                     f"{b['seconds']} s | {b['peak_rss_gib']} GiB | {exact} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from megarank.files import atomic_write_text

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["1b", "8b"])
    p.add_argument("--workdir", type=Path, default=None, help="where the checkpoints go (default: a temp dir in /tmp)")
    p.add_argument("--no-check", action="store_true", help="skip the bit-exact round-trip check")
    p.add_argument("--report", type=Path, default=None, help="also write the markdown table here")
    p.add_argument("--json", type=Path, default=None, help="also write the results and the environment here")
    args = p.parse_args(argv)
    env = environment()
    print(header(env), flush=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="megarank-convert-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for size in args.sizes:
        need = 3.1 * sum(torch.Size(s).numel() * 2 for _, s in hf_tensor_plan({**COMMON, **SIZES[size]}))
        free = shutil.disk_usage(workdir).free
        if free < need:
            msg = f"needs ~{need / 1e9:.0f} GB free in {workdir}, has {free / 1e9:.0f} GB"
            print(f"[{size}] skipped: {msg}", flush=True)
            results.append({"size": size, "skipped": msg})
            continue
        results.append(bench(size, workdir, not args.no_check))
    command = "python benchmarks/convert_bench.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:] if argv is None else argv))
    table = markdown(results, command, env)
    print(table)
    print(json.dumps(results, indent=1))
    if args.report:
        atomic_write_text(args.report, table)
    if args.json:
        write_json(args.json, {"command": command, "results": results}, env)
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
