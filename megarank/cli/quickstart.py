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

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


class StepFailed(RuntimeError):
    """A pipeline step exited non-zero; it has printed its own error, this names the step."""

    def __init__(self, cmd: list, returncode: int):
        super().__init__(f"step `{' '.join(str(c) for c in cmd[:4])} ...` exited with code {returncode} "
                         "(its error is printed above); nothing after it was run")
        self.exit_code = returncode if 0 < returncode < 128 else 1


def _run(step: list, nproc: int = 1) -> None:
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m"] + step
    else:
        cmd = [sys.executable, "-m"] + step
    print("\n$ " + " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    returncode = subprocess.run([str(c) for c in cmd]).returncode
    if returncode != 0:
        raise StepFailed(step, returncode)


def _check_args(args, data: str) -> None:
    """Fail before the first step on what would fail later: the data folder, the config, the work folder."""
    from megarank.config import load_config
    from megarank.cli.preflight import UsageError, beir_problem, check_output_dir

    for split in ("train", "test"):
        if problem := beir_problem(data, split):
            raise UsageError(f"--data {data} {problem} (the quickstart trains on 'train' and evaluates on 'test')")
    load_config(args.config, list(args.overrides))  # a bad override is named now, not after init and convert
    check_output_dir(args.workdir, "--workdir")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {args.nproc}")


def main(argv=None) -> int:
    from megarank.data import sample_data_dir

    p = argparse.ArgumentParser(prog="megarank quickstart", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/quickstart", help="where every artefact goes (default runs/quickstart)")
    p.add_argument("--config", default=str(REPO_CONFIGS / "tiny.yaml"), help="training config (default configs/tiny.yaml)")
    p.add_argument("--data", default=None, help="BEIR folder with train/test qrels and candidates (default: built-in sample)")
    p.add_argument("--steps", type=int, default=None, help="override train.steps")
    p.add_argument("--nproc", type=int, default=1, help="processes for train/evaluate (torchrun); e.g. 2 with TP=2 overrides")
    p.add_argument("overrides", nargs="*", help="extra dotted config overrides for training, e.g. parallel.tensor_model_parallel_size=2")
    args = p.parse_args(argv)
    data = args.data or str(sample_data_dir())
    _check_args(args, data)
    w = Path(args.workdir).resolve()
    w.mkdir(parents=True, exist_ok=True)
    start = time.time()
    _run(["megarank", "init-tiny", w / "base-hf", "--config", args.config, "--overwrite"])
    _run(["checkpoint_tools", "hf-to-megatron", w / "base-hf", w / "base-megatron", "--config", args.config, "--overwrite"])
    train = ["megarank", "train", args.config, f"checkpoint.load={w / 'base-megatron'}", f"checkpoint.dir={w / 'train'}",
             f"data.train_path={data}"]  # evaluated once, by the evaluate step below
    if args.steps:
        train.append(f"train.steps={args.steps}")
    _run(train + list(args.overrides), args.nproc)
    from megarank.checkpoint import resolve_checkpoint

    step_dir = resolve_checkpoint(w / "train")
    # fp32 as trained: --dtype auto would pick bf16 on some CPUs only, and the quickstart's metrics should not
    # depend on the machine's ISA.
    _run(["megarank", "evaluate", step_dir, "--data", data, "--split", "test", "--out", w / "test.run.trec",
          "--metrics-out", w / "test.metrics.json", "--dtype", "fp32"], args.nproc)
    _run(["checkpoint_tools", "megatron-to-hf", step_dir, w / "reranker-hf", "--overwrite"])
    _run(["checkpoint_tools", "verify", w / "reranker-hf", step_dir])
    print(f"\nquickstart finished in {time.time() - start:.0f} s: HF reranker in {w / 'reranker-hf'}, "
          f"metrics in {w / 'test.metrics.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
