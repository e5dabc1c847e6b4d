"""`megarank quickstart`: the whole pipeline on the built-in tiny default, each step a real command.

    init-tiny (random tiny HF Llama + byte tokenizer) -> hf-to-megatron -> train -> evaluate -> megatron-to-hf
    -> verify (the exported HF folder, loaded by transformers, scores like megarank)

Every command is printed before it runs, so the log doubles as a recipe for real models.
"""
import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _run(cmd: list, nproc: int = 1) -> None:
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m"] + cmd
    else:
        cmd = [sys.executable, "-m"] + cmd
    print("\n$ " + " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True)


def main(argv=None) -> int:
    from megarank.checkpoint import resolve_checkpoint
    from megarank.data import sample_data_dir

    p = argparse.ArgumentParser(prog="megarank quickstart", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/quickstart", help="where every artefact goes (default runs/quickstart)")
    p.add_argument("--config", default=str(REPO_CONFIGS / "tiny.yaml"), help="training config (default configs/tiny.yaml)")
    p.add_argument("--data", default=None, help="BEIR folder with train/test qrels and candidates (default: built-in sample)")
    p.add_argument("--steps", type=int, default=None, help="override train.steps")
    p.add_argument("--nproc", type=int, default=1, help="processes for train/evaluate (torchrun); e.g. 2 with TP=2 overrides")
    p.add_argument("overrides", nargs="*", help="extra dotted config overrides for training, e.g. parallel.tensor_model_parallel_size=2")
    args = p.parse_args(argv)
    w = Path(args.workdir).resolve()
    w.mkdir(parents=True, exist_ok=True)
    data = args.data or str(sample_data_dir())
    start = time.time()
    _run(["megarank", "init-tiny", w / "base-hf", "--config", args.config, "--overwrite"])
    _run(["checkpoint_tools", "hf-to-megatron", w / "base-hf", w / "base-megatron", "--config", args.config, "--overwrite"])
    train = ["megarank", "train", args.config, f"checkpoint.load={w / 'base-megatron'}", f"checkpoint.dir={w / 'train'}",
             f"data.train_path={data}", f"data.eval_path={data}", "data.eval_split=test"]
    if args.steps:
        train.append(f"train.steps={args.steps}")
    _run(train + list(args.overrides), args.nproc)
    step_dir = resolve_checkpoint(w / "train")
    _run(["megarank", "evaluate", step_dir, "--data", data, "--split", "test", "--out", w / "test.run.trec",
          "--metrics-out", w / "test.metrics.json"], args.nproc)
    _run(["checkpoint_tools", "megatron-to-hf", step_dir, w / "reranker-hf", "--overwrite"])
    _run(["checkpoint_tools", "verify", w / "reranker-hf", step_dir])
    print(f"\nquickstart finished in {time.time() - start:.0f} s: HF reranker in {w / 'reranker-hf'}, "
          f"metrics in {w / 'test.metrics.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
