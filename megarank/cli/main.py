"""`megarank train|evaluate|rerank|mine|launch|quickstart|init-tiny|config-help` — the command line.

    megarank train CONFIG [section.key=value ...]
    megarank evaluate CHECKPOINT --data BEIR_DIR [--split test] [--run RUN] [--top-k 100] [--out run.trec]
                      [--batch-tokens 16384] [--batch-size N] [--dtype auto|fp32|bf16]
    megarank rerank CHECKPOINT --data BEIR_DIR --out run.trec [...]  (same as evaluate, --out required; saved in
                      parts, a re-run after a kill scores only the rest: teacher scores for any run)
    megarank mine --data BEIR_DIR --run RUN [--teacher CKPT | --teacher-run SCORED_RUN] --out groups.jsonl [...]

Bad input (config, data, paths, checkpoints) ends in one line, ``megarank CMD: error: <what, naming the file,
line, key or flag>``, exit code 2, no traceback (MEGARANK_TRACEBACK=1 shows it); see `run_reporting_errors`.
Ctrl-C ends any command in one line, ``megarank CMD: interrupted``, exit code 130 (`megarank train` saves first:
megarank/training/preemption.py). Known upstream warnings are hidden unless ``--verbose`` or MEGARANK_VERBOSE=1
(megarank/warnings_filter.py).
"""
import argparse
import json
import logging
import os
import signal
import sys


def _setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    for noisy in ("megatron", "torch.distributed", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if level == "DEBUG":  # logging.level=DEBUG in a training config: the upstream warnings too (before they fire)
        from megarank.warnings_filter import show_known_warnings

        show_known_warnings(export=False)


def _quiet_warnings(verbose: bool = False) -> None:
    """The known upstream warnings (megarank/warnings_filter.py) hidden, or shown with --verbose /
    MEGARANK_VERBOSE=1 (exported, so torchrun workers and quickstart steps show them too)."""
    from megarank.warnings_filter import quiet_known_warnings, show_known_warnings

    if verbose:
        show_known_warnings(export=True)
    else:
        quiet_known_warnings()


def cmd_train(args) -> int:
    from megarank.config import load_config, validate
    from megarank.cli.preflight import check_train_config

    cfg = load_config(args.config, args.overrides)
    # Before torch/megatron-core import (seconds): the config on its own (train() checks it again against the
    # world size), then missing inputs and unwritable outputs.
    validate(cfg)
    check_train_config(cfg)
    _setup_logging(cfg.logging.level)
    from megarank.training.loop import train
    from megarank.training.watchdog import stop_if_agent_gone

    try:
        train(cfg)
    except BaseException:
        # A peer whose torchrun agent died ends the collective this rank waits in (gloo: "Connection closed by
        # peer") before this rank's watchdog thread polls again: when the agent is gone that is the cause to
        # report, and the exit is the watchdog's (no save, no traceback).
        stop_if_agent_gone()
        raise
    return 0


def _int_at_least(minimum: int):
    """argparse type: an integer >= ``minimum`` (``--top-k 0`` would rerank nothing and report zeros)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)


def _eval_args(p: argparse.ArgumentParser, out_required: bool = False) -> None:
    from megarank.config import DEFAULT_EVAL_BATCH_TOKENS as DEFAULT_BATCH_TOKENS  # yaml only: no torch here

    p.add_argument("checkpoint", help="a megarank checkpoint folder (converted or step-N), or a run dir with `latest`")
    p.add_argument("--data", required=True, help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)")
    p.add_argument("--split", default="test", help="qrels split (default: test)")
    p.add_argument("--run", default=None, help="first-stage run to rerank (default: <data>/candidates/<split>.*.tsv)")
    p.add_argument("--top-k", type=_positive_int, default=100, help="candidates reranked per query (default 100)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="pairs per scoring batch: 32 by default with --batch-tokens 0, else an upper bound (default none)")
    p.add_argument("--batch-tokens", type=_non_negative_int, default=DEFAULT_BATCH_TOKENS,
                   help="token budget per scoring batch: length-sorted pairs fill each batch while the tokens the model "
                        f"runs (rows x padded length, or the packed stream) stay within it (default {DEFAULT_BATCH_TOKENS}; "
                        "0 = fixed --batch-size); same scores as fixed batches")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="compute dtype: auto = bf16 where bf16 matmuls are native (CUDA with bf16, a CPU with AMX-BF16 "
                        "or AVX512-BF16), else the checkpoint's; the report says which ran and why (default auto)")
    p.add_argument("--max-queries", type=_positive_int, default=None, help="only the first N queries (quick checks)")
    p.add_argument("--out", default=None, required=out_required,
                   help="write the reranked TREC run file here (with every candidate's score: a teacher run for "
                        "data.teacher_run / megarank mine --teacher-run). Scores are saved in OUT.parts/ every "
                        "--queries-per-part queries; the same command after a kill scores only the rest")
    p.add_argument("--queries-per-part", type=_positive_int, default=1000,
                   help="queries per saved part of an --out job (default 1000)")
    p.add_argument("--metrics-out", default=None, help="write the metrics as JSON here")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. parallel.tensor_model_parallel_size=2")


def cmd_evaluate(args) -> int:
    from megarank.cli.evaluate import run_evaluation

    _setup_logging()
    return run_evaluation(args)


def cmd_launch(argv) -> int:
    from megarank.cli.launch import main as launch_main

    return launch_main(argv)


def cmd_mine(args) -> int:
    from megarank.cli.mine import run_mine

    _setup_logging()
    return run_mine(args)


def cmd_init_tiny(args) -> int:
    from megarank.cli.preflight import check_output_dir

    check_output_dir(args.out, "output folder")
    from megarank.cli.tiny import write_tiny_hf_model

    _setup_logging()
    path = write_tiny_hf_model(args.out, config_path=args.config, seed=args.seed, overwrite=args.overwrite)
    print(json.dumps({"tiny_hf_model": str(path)}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megarank", description="Train and evaluate bidirectional Llama rerankers.")
    parser.add_argument("--verbose", action="store_true",
                        help="also show the upstream warnings megarank hides (listed in megarank/warnings_filter.py); "
                             "accepted anywhere on the line, same as MEGARANK_VERBOSE=1")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train (or resume) a reranker")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-5")
    p.set_defaults(fn=cmd_train)
    for name, text in (("evaluate", "rerank a BEIR split and report nDCG@10 / MRR@10 / Recall"),
                       ("rerank", "rerank first-stage candidates and write a TREC run (--out)")):
        p = sub.add_parser(name, help=text)
        _eval_args(p, out_required=name == "rerank")
        p.set_defaults(fn=cmd_evaluate)
    p = sub.add_parser("mine", help="mine positive-aware hard negatives into JSONL training groups (with teacher scores)")
    from megarank.cli.mine import add_mine_args  # argparse only: no torch here

    add_mine_args(p)
    p.set_defaults(fn=cmd_mine)
    p = sub.add_parser("init-tiny", help="write the built-in tiny random HF Llama + tokenizer (the quickstart's base model)")
    p.add_argument("out", help="output folder")
    p.add_argument("--config", default=None, help="megarank YAML whose model section gives the shape (default configs/tiny.yaml values)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=cmd_init_tiny)
    p = sub.add_parser("config-help", help="print every config key with its default and meaning")
    p.set_defaults(fn=lambda a: print(__import__("megarank.config", fromlist=["x"]).config_help()) or 0)
    sub.add_parser("launch", help="start a run with torchrun / srun (see `megarank launch --help`)", add_help=False)
    sub.add_parser("quickstart", help="init-tiny -> convert -> train -> evaluate -> export -> verify (see --help)", add_help=False)
    return parser


# The exceptions that mean "bad input", shown as one line (no traceback) with their exit code. They are looked
# up in sys.modules rather than imported: a type whose module was never imported cannot have been raised, and
# a command that fails on its config must not wait for torch and megatron-core to import first.
_ONE_LINE_ERRORS = (
    ("megarank.config", "ConfigError", 2),
    ("megarank.cli.preflight", "UsageError", 2),
    ("megarank.data.errors", "DataError", 2),
    ("megarank.checkpoint", "CheckpointError", 2),
    ("megarank.training.loop", "NonFiniteError", 1),
    ("megarank.cli.quickstart", "StepFailed", 1),  # the step's own exit code when it has one (exit_code)
)


def _one_line(e: BaseException) -> tuple[str, int] | None:
    """(message, exit code) for a user-facing error, or None for a bug (which keeps its traceback)."""
    for module, name, code in _ONE_LINE_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(e, cls):
            return str(e), getattr(e, "exit_code", code)
    if isinstance(e, OSError) and e.filename is not None:  # e.g. a disk that fills up: name the file
        return f"{e.filename}: {e.strerror or e}", 1
    return None


EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command ended by Ctrl-C


def _interrupted(command: str, e: BaseException) -> int:
    """Ctrl-C: ``megarank <command>: interrupted`` (or the command's own line, e.g. train's saved step), exit 130.

    A further Ctrl-C while the process ends exits at once, so clean-up never shows a second traceback."""
    try:
        signal.signal(signal.SIGINT, lambda *_: os._exit(EXIT_INTERRUPTED))
    except ValueError:  # not the main thread
        pass
    message = getattr(e, "message", "interrupted")
    if message:  # None: a rank that does not report (train under torchrun)
        # train's line ends its log, on stdout (under torchrun each stream is relayed on its own: same order)
        stream = getattr(e, "stream", None) or sys.stderr
        print(f"{' '.join(['megarank', command]).strip()}: {message}", file=stream, flush=True)
    return getattr(e, "exit_code", EXIT_INTERRUPTED)


class _ForegroundChildren:
    """While a child process runs, leave the first Ctrl-C to it, as a shell does with its foreground job: the
    terminal sends SIGINT to the whole foreground process group, so the step `megarank quickstart` runs gets it
    too, and `megarank train` saves before it exits 130. Python's default would raise KeyboardInterrupt in
    ``subprocess.run``, which then kills that step in the middle of its save. With no child running, or on the
    second Ctrl-C, KeyboardInterrupt is raised as usual (``subprocess.run`` kills the step, which got the same
    second Ctrl-C and stops at once anyway)."""

    def __init__(self):
        self.count = 0
        self._previous = None

    def __enter__(self):
        import psutil

        self._me = psutil.Process()
        self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        self.count += 1
        if self.count == 1 and self._me.children():
            return
        raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)


def run_reporting_errors(command: str, fn, *args, foreground_children: bool = False) -> int:
    """Run one command; a user-facing error becomes ``megarank <command>: error: <sentence>`` on stderr, and
    Ctrl-C ``megarank <command>: interrupted`` with exit code 130 (no traceback).

    ``foreground_children``: the command runs its steps as child processes in this process group (quickstart);
    the first Ctrl-C is theirs to handle, and the step's failure it causes is reported as the interruption.
    MEGARANK_TRACEBACK=1 shows the traceback as well (debugging).
    """
    deferred = _ForegroundChildren() if foreground_children else None
    try:
        if deferred is None:
            return fn(*args)
        with deferred:
            return fn(*args)
    except KeyboardInterrupt as e:
        if os.environ.get("MEGARANK_TRACEBACK") == "1":
            raise
        return _interrupted(command, e)
    except Exception as e:  # noqa: BLE001 - classified below; anything else is re-raised untouched
        if deferred is not None and deferred.count and os.environ.get("MEGARANK_TRACEBACK") != "1":
            return _interrupted(command, KeyboardInterrupt())  # the step ended because of the Ctrl-C
        shown = _one_line(e)
        if shown is None or os.environ.get("MEGARANK_TRACEBACK") == "1":
            raise
        # The line and its newline in one write: the ranks of a torchrun job print it at once to one stream, and
        # with PYTHONUNBUFFERED print() writes the text and the "\n" separately, so two ranks' lines could merge.
        print(f"megarank {command}: error: {shown[0]}\n", end="", file=sys.stderr, flush=True)
        return shown[1]


def _pop_verbose(argv: list) -> bool:
    """Remove ``--verbose`` from the command line (any position; for `launch --script` only before the
    script, whose own arguments are left alone); -> whether it was there."""
    end = len(argv)
    if argv[:1] == ["launch"] and "--script" in argv:
        end = argv.index("--script")
    found = "--verbose" in argv[:end]
    argv[:end] = [a for a in argv[:end] if a != "--verbose"]
    return found


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = _pop_verbose(argv)
    _quiet_warnings(verbose)
    command = next((a for a in argv if not a.startswith("-")), "")
    try:
        if argv[:1] == ["launch"]:
            return run_reporting_errors("launch", cmd_launch, argv[1:])
        if argv[:1] == ["quickstart"]:
            from megarank.cli.quickstart import main as quickstart_main

            return run_reporting_errors("quickstart", quickstart_main, argv[1:], foreground_children=True)
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        # Dotted overrides may come after options too (`evaluate CKPT --data X parallel.tensor_model_parallel_size=2`).
        if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return run_reporting_errors(args.command, args.fn, args)
    except KeyboardInterrupt as e:  # before the command started (argument parsing, imports)
        return _interrupted(command or "", e)


if __name__ == "__main__":
    sys.exit(main())
