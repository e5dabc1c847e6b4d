"""`megarank quickstart`: the whole pipeline on the built-in tiny default, each step a real command.

    init-tiny (random tiny HF Llama + byte tokenizer) -> hf-to-megatron -> train -> evaluate -> megatron-to-hf
    -> verify (the exported HF folder, loaded by transformers, scores like megarank)

Every command is printed before it runs, so the log doubles as a recipe for real models. A quickstart never
resumes an earlier one: a non-empty --workdir is refused, or replaced with --overwrite (the old folder is moved
aside, deleted once the new quickstart finished, and moved back if it fails).

The numbers it prints are a plumbing check, not a reranker's quality: the model is a small Llama with random
weights trained a few steps; the first stage's metrics are the baseline.
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
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


def _inside(path, folder: Path) -> bool:
    path = Path(path).resolve()
    return path == folder or folder in path.parents


def _check_args(args, data: str):
    """Fail before the first step on what would fail later: the data folder, the config, the work folder.
    -> the training config (with --steps and the overrides)."""
    from megarank.config import load_config
    from megarank.cli.preflight import UsageError, beir_problem, check_output_dir

    for split in ("train", "test"):
        if problem := beir_problem(data, split):
            raise UsageError(f"--data {data} {problem} (the quickstart trains on 'train' and evaluates on 'test')")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    # a bad override is named now, not after init and convert
    cfg = load_config(args.config, ([f"train.steps={args.steps}"] if args.steps else []) + list(args.overrides))
    check_output_dir(args.workdir, "--workdir")
    if args.nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {args.nproc}")
    w = Path(args.workdir).resolve()
    if w.is_dir() and any(w.iterdir()):
        if not args.overwrite:
            raise UsageError(f"--workdir {args.workdir} is not empty (an earlier quickstart's files?), and a quickstart "
                             "never resumes one; pass --overwrite to replace it, or choose another --workdir")
        for what, path in (("the current folder", Path.cwd()), ("--data", data), ("--config", args.config)):
            if _inside(path, w):
                raise UsageError(f"--overwrite would move {what} ({path}) away with --workdir {args.workdir}; "
                                 "choose another --workdir")
    return cfg


def _move_aside(w: Path) -> Path:
    """Rename the old work folder into a hidden sibling (one rename: ``w`` is never half old, half new)."""
    aside = Path(tempfile.mkdtemp(prefix=f".{w.name}.old-", dir=w.parent))
    os.rename(w, aside / w.name)
    print(f"--overwrite: moved the previous {w} aside to {aside / w.name}; it is deleted when this quickstart "
          "finishes, and moved back if it fails", flush=True)
    return aside


def _summary(w: Path, cfg) -> str:
    """What the numbers are, in two lines: the test metrics next to the first stage's, and what they mean."""
    try:
        report = json.loads((w / "test.metrics.json").read_text())
        ours, first = report["megarank"], report["first_stage"]
    except (OSError, ValueError, KeyError):
        return ""
    shown = [k for k in ("nDCG@10", "MRR@10") if k in ours and k in first]
    line = " | ".join(f"{k} {ours[k]:.4f} (first stage {first[k]:.4f})" for k in shown)
    return (f"test split, {report.get('queries', '?')} queries reranked: {line}\n"
            f"These numbers check the plumbing, not a reranker: the model is a {cfg.model.num_layers}-layer Llama with "
            f"random weights trained {cfg.train.steps} steps; the first stage's numbers are the baseline a real model "
            "should beat.")


def main(argv=None) -> int:
    from megarank.data import sample_data_dir

    p = argparse.ArgumentParser(prog="megarank quickstart", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/quickstart", help="where every artefact goes (default runs/quickstart)")
    p.add_argument("--config", default=str(REPO_CONFIGS / "tiny.yaml"), help="training config (default configs/tiny.yaml)")
    p.add_argument("--data", default=None, help="BEIR folder with train/test qrels and candidates (default: built-in sample)")
    p.add_argument("--steps", type=int, default=None, help="override train.steps")
    p.add_argument("--nproc", type=int, default=1, help="processes for train/evaluate (torchrun); e.g. 2 with TP=2 overrides")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --workdir (moved aside first, deleted when this quickstart finishes, "
                        "moved back if it fails); without it a non-empty --workdir is refused")
    p.add_argument("overrides", nargs="*", help="extra dotted config overrides for training, e.g. parallel.tensor_model_parallel_size=2")
    args = p.parse_args(argv)
    data = args.data or str(sample_data_dir())
    cfg = _check_args(args, data)
    w = Path(args.workdir).resolve()
    start = time.time()
    aside = _move_aside(w) if w.is_dir() and any(w.iterdir()) else None  # --overwrite (checked above)
    try:
        _pipeline(args, data, w)
    except BaseException:
        if aside is not None:
            shutil.rmtree(w, ignore_errors=True)
            os.rename(aside / w.name, w)
            shutil.rmtree(aside, ignore_errors=True)
            print(f"the previous {w} was moved back", flush=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    print(f"\nquickstart finished in {time.time() - start:.0f} s: HF reranker in {w / 'reranker-hf'}, "
          f"metrics in {w / 'test.metrics.json'}", flush=True)
    if summary := _summary(w, cfg):
        print(summary, flush=True)
    return 0


def _pipeline(args, data: str, w: Path) -> None:
    w.mkdir(parents=True, exist_ok=True)
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


if __name__ == "__main__":
    sys.exit(main())
