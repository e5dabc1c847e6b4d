"""``megarank-convert`` / ``python -m checkpoint_tools``: hf-to-megatron, megatron-to-hf, lora-to-peft, verify."""
from __future__ import annotations

import argparse
import sys

from checkpoint_tools.errors import ConversionError
from checkpoint_tools.tf32 import TF32_OVERRIDE, clear_tf32_override
from megarank.warnings_filter import quiet_known_warnings, show_known_warnings, verbose_requested

DESCRIPTION = """Convert between Hugging Face Llama checkpoints and megarank (megatron-core torch_dist) checkpoints.
Conversions stream one tensor at a time and write into a temp folder beside DST that is renamed into place only
when everything succeeded, so a failed run leaves no DST behind."""

IMPORT_HELP = """Read an HF Llama folder (LlamaForCausalLM, LlamaForSequenceClassification, or NVIDIA's
LlamaBidirectionalForSequenceClassification / llama_bidirec) and write a megarank checkpoint folder: config.yaml
(the full megarank config), tokenizer/ (the tokenizer files), model/ (torch_dist weights) and
megarank_checkpoint.json. The LM head is ignored; a base LM gets a new score head ~ normal(0, init_method_std).
The result loads at ANY tensor/pipeline-parallel size: the checkpoint stores global tensors."""

EXPORT_HELP = """Read a megarank checkpoint folder (converted, or a training step folder saved at any TP/PP;
optimizer state is skipped; a run directory with a `latest` file means its latest step) and write an HF reranker
folder: config.json (LlamaBidirectionalForSequenceClassification, model_type llama_bidirec, auto_map), the
modeling files, sharded safetensors + model.safetensors.index.json and the tokenizer files. It loads with
AutoModelForSequenceClassification.from_pretrained(DST, trust_remote_code=True) and
sentence_transformers.CrossEncoder(DST, trust_remote_code=True)."""

PEFT_HELP = """Read a LoRA training step (model.lora_rank > 0) and write a PEFT adapter folder: adapter_config.json
and adapter_model.safetensors, on the HF module names of the exported reranker (q/k/v/o_proj, gate/up/down_proj; the
fused megatron adapters split exactly), with the trained score head (and final norm, if it trained) as
modules_to_save. Load it on the base's export: peft.PeftModel.from_pretrained(AutoModelForSequenceClassification
.from_pretrained(BASE_EXPORT, trust_remote_code=True), DST); it scores as the merged export (megatron-to-hf on SRC)."""

VERIFY_HELP = """Load SRC_HF and the megarank checkpoint on CPU in fp32, score a few built-in query/passage pairs with
both, print the scores and the max abs difference, and exit 1 when it is above --tol. The HF side runs SRC_HF's
weights in the bidirectional reranker network of the export's modeling file (what a conversion preserves), with the
checkpoint's pooling and temperature; a base LM has no score head, so the checkpoint's new head is used on both
sides. Pairs are encoded as megarank does (config template, BOS, right padding) with SRC_HF's tokenizer."""


def _common_output(p):
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists (otherwise an existing DST is an error)")
    p.add_argument("--quiet", action="store_true", help="no progress lines (the summary line is still printed)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="store the weights in this dtype (default: keep each tensor's dtype, which makes round trips bit-exact)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megarank-convert", description=DESCRIPTION)
    parser.add_argument("--verbose", action="store_true", help=(
        "also show the upstream warnings hidden by default (listed in megarank/warnings_filter.py); accepted "
        "anywhere on the line, same as MEGARANK_VERBOSE=1"))
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{hf-to-megatron,megatron-to-hf,lora-to-peft,verify}")

    p = sub.add_parser("hf-to-megatron", help="HF Llama folder -> megarank checkpoint folder", description=IMPORT_HELP)
    p.add_argument("src", metavar="SRC", help="HF model folder (config.json + *.safetensors [+ index] + tokenizer files)")
    p.add_argument("dst", metavar="DST", help="megarank checkpoint folder to create")
    p.add_argument("--tp", type=int, default=1, help=(
        "only sets the vocabulary padding: the embedding is padded with zero rows to a multiple of "
        "make_vocab_size_divisible_by x TP, as a TP-sized run would save it. The checkpoint loads at any TP either way "
        "(megatron's embedding accepts a different padded size on load and zero-fills the rest). Default 1."))
    p.add_argument("--pp", type=int, default=1, help=(
        "accepted for symmetry; it changes nothing: the conversion always runs in one process and the checkpoint "
        "stores global tensors that load at any pipeline-parallel size"))
    p.add_argument("--pooling", choices=("avg", "last", "cls"), default=None,
                   help="how token states become one vector (default: the source's for llama_bidirec inputs, else avg or --config's)")
    p.add_argument("--temperature", type=float, default=None, help="scores are divided by this (default: the source's, else 1.0)")
    p.add_argument("--config", metavar="YAML", default=None, help=(
        "a megarank config to embed (data/train/... sections and model settings such as dtype and transformer_impl); "
        "architecture keys it sets must agree with the HF config.json, or the conversion stops"))
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=None, dest="make_vocab_size_divisible_by",
                   help="vocabulary padding unit (default: --config's, else 128)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the new score head of a base LM (default 1234)")
    p.add_argument("--allow-pickle", action="store_true", help=(
        "also read PyTorch .bin weights when SRC has no safetensors (pickle files can run code when loaded: only for "
        "files you trust; they are read with weights_only=True)"))
    p.add_argument("--allow-causal", action="store_true", help=(
        "import a llama_bidirec/NeMo config that says is_causal: true (refused otherwise: megarank runs every "
        "reranker with bidirectional attention, so such weights would not score as they were trained)"))
    _common_output(p)

    p = sub.add_parser("megatron-to-hf", help="megarank checkpoint -> HF reranker folder", description=EXPORT_HELP)
    p.add_argument("src", metavar="SRC", help="megarank checkpoint folder, or a run directory with a `latest` file")
    p.add_argument("dst", metavar="DST", help="HF folder to create")
    p.add_argument("--config", metavar="YAML", default=None, help=(
        "the config you expect the checkpoint to have: any model key it sets that contradicts SRC/config.yaml stops the export"))
    p.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="tokenizer folder to ship (default: SRC/tokenizer, else the config's data.tokenizer)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    _common_output(p)

    p = sub.add_parser("lora-to-peft", help="LoRA training step -> PEFT adapter folder", description=PEFT_HELP)
    p.add_argument("src", metavar="SRC", help="LoRA step folder, or a LoRA run directory with a `latest` file")
    p.add_argument("dst", metavar="DST", help="adapter folder to create")
    p.add_argument("--base-model", metavar="DIR", default=None, help=(
        "the HF export of the step's base (megarank-convert megatron-to-hf BASE DIR): checked to be that base and "
        "written as base_model_name_or_path"))
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists (otherwise an existing DST is an error)")

    p = sub.add_parser("verify", help="compare HF and megarank scores on built-in pairs", description=VERIFY_HELP)
    p.add_argument("src_hf", metavar="SRC_HF", help="HF model folder (the conversion's source, or an export)")
    p.add_argument("dst_megatron", metavar="DST_MEGATRON", help="megarank checkpoint folder")
    p.add_argument("--tol", type=float, default=1e-4, help="largest allowed max abs score difference (default 1e-4)")
    return parser


def run(args) -> int:
    if args.command == "hf-to-megatron":
        from checkpoint_tools.import_hf import hf_to_megatron

        if args.tp < 1 or args.pp < 1:
            raise ConversionError(f"--tp and --pp must be >= 1 (got {args.tp}, {args.pp})")
        print(hf_to_megatron(
            args.src, args.dst, tp=args.tp, pp=args.pp, pooling=args.pooling, temperature=args.temperature,
            config=args.config, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, dtype=args.dtype,
            seed=args.seed, allow_pickle=args.allow_pickle, allow_causal=args.allow_causal, overwrite=args.overwrite,
            quiet=args.quiet,
        ))
        return 0
    if args.command == "megatron-to-hf":
        from checkpoint_tools.export_hf import megatron_to_hf
        from checkpoint_tools.hf_writer import parse_size

        try:
            shard = parse_size(args.max_shard_size)
        except ValueError as e:
            raise ConversionError(f"--max-shard-size: {e}") from None
        print(megatron_to_hf(args.src, args.dst, config=args.config, tokenizer=args.tokenizer, dtype=args.dtype,
                             max_shard_size=shard, overwrite=args.overwrite, quiet=args.quiet))
        return 0
    if args.command == "lora-to-peft":
        from checkpoint_tools.peft_export import lora_to_peft

        print(lora_to_peft(args.src, args.dst, base_model=args.base_model, overwrite=args.overwrite))
        return 0
    from checkpoint_tools.verify import verify

    return 0 if verify(args.src_hf, args.dst_megatron, tol=args.tol) <= args.tol else 1


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv or verbose_requested()
    argv = [a for a in argv if a != "--verbose"]
    # the known upstream warnings (Apex/TE missing, cuda_graph_scope, torch_dist's FutureWarnings), the same
    # list `megarank` hides: megarank/warnings_filter.py
    if verbose:
        show_known_warnings(export=True)
    else:
        quiet_known_warnings()
    command = next((a for a in argv if not a.startswith("-")), "")
    if command == "verify" and clear_tf32_override():  # before torch is imported: checkpoint_tools/tf32.py
        print(f"verify: {TF32_OVERRIDE}=1 ignored: fp32 scores are compared, TF32 would round them", flush=True)
    try:
        args = build_parser().parse_args(argv)
        return run(args)
    except ConversionError as e:
        print(f"megarank-convert {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outputs are written to a temp folder renamed into place at the end: none is left
        print(f"{' '.join(['megarank-convert', command]).strip()}: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
