"""`megarank launch`: validate a config against the world size, then start it under torchrun on this node.

    megarank launch configs/tiny.yaml train.steps=10                  # one node, NPROC workers
    NPROC=8 NNODES=2 MASTER_ADDR=node001 megarank launch CONFIG ...   # run once per node (launch/slurm does)
    megarank launch --dry-run --nproc 8 --nnodes 4 CONFIG ...         # check the layout, print the command

One torchrun agent per node starts the workers (c10d rendezvous, as Megatron-LM/NeMo/torchtitan do); the
agent of every node runs the same command. Settings come from the environment (flags override them):
NPROC (workers per node; default: visible GPUs, else 1), NNODES (1), NODE_RANK (0, static rendezvous only),
MASTER_ADDR (rendezvous host; unset on one node = a private standalone rendezvous), MASTER_PORT (29500),
RDZV_ID (rendezvous id; SLURM_JOB_ID under SLURM), RDZV_BACKEND (c10d or static), LOG_RANKS (local ranks
whose output reaches the console: "0", "0,3" or "all"), LOG_DIR (every rank's stdout/stderr as files).

The layout is validated before anything starts (megarank.config.validate with world size = NNODES x NPROC),
so an impossible TP x PP x DP or batch split fails in a second on the login node, not after the allocation.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import shlex
import signal
import sys
from typing import Optional, Sequence

DEFAULT_PORT = 29500

# Set for every worker unless the environment already has it. With one hardware work queue per GPU, kernels
# start in the order they were launched, so an asynchronous collective launched before a GEMM really runs
# first: megatron-core's tensor-parallel layers rely on this to overlap the sequence-parallel all-gather and
# the gradient all-reduce / reduce-scatter with the backward GEMMs (tensor_parallel/layers.py:526, :545, :558,
# "we rely on CUDA_DEVICE_MAX_CONNECTIONS=1"), and DDP's bucketed gradient reduction likewise
# (distributed_data_parallel.py:219). Megatron-LM's Llama scripts export it. It must be set before CUDA
# starts, hence here, in the launcher; on CPU it changes nothing.
WORKER_ENV = {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}


def worker_env(environ=None) -> dict:
    """The variables the launcher adds for the workers (those not already set in ``environ``)."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in WORKER_ENV.items() if k not in environ}


class LaunchError(ValueError):
    """A launch setting that cannot work; the message names the setting."""


@dataclasses.dataclass
class Layout:
    """Where the workers go: `nnodes` nodes with `nproc` workers each."""

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: Optional[str] = None
    master_port: int = DEFAULT_PORT
    rdzv_id: str = "megarank"
    rdzv_backend: str = "c10d"

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    def check(self) -> None:
        errs = []
        if self.nproc < 1:
            errs.append(f"NPROC/--nproc must be >= 1 (got {self.nproc})")
        if self.nnodes < 1:
            errs.append(f"NNODES/--nnodes must be >= 1 (got {self.nnodes})")
        if not 0 <= self.node_rank < max(self.nnodes, 1):
            errs.append(f"NODE_RANK/--node-rank must be in [0, {self.nnodes}) (got {self.node_rank})")
        if self.nnodes > 1 and not self.master_addr:
            errs.append("MASTER_ADDR/--master-addr is required with more than one node (the rendezvous host)")
        if not 0 < self.master_port < 65536:
            errs.append(f"MASTER_PORT/--master-port must be a TCP port (got {self.master_port})")
        if self.rdzv_backend not in ("c10d", "static"):
            errs.append(f"RDZV_BACKEND/--rdzv-backend must be c10d or static (got {self.rdzv_backend!r})")
        if errs:
            raise LaunchError("invalid launch layout:\n  - " + "\n  - ".join(errs))


def build_command(
    config: Optional[str],
    overrides: Sequence[str] = (),
    layout: Optional[Layout] = None,
    *,
    log_ranks: str = "0",
    log_dir: Optional[str] = None,
    script: Optional[str] = None,
    python: str = sys.executable,
) -> list[str]:
    """The torchrun command line (argv) that runs `megarank train CONFIG OVERRIDES` (or `script`) on this node."""
    layout = layout or Layout()
    layout.check()
    cmd = [python, "-m", "torch.distributed.run", f"--nnodes={layout.nnodes}", f"--nproc-per-node={layout.nproc}"]
    if layout.nnodes == 1 and not layout.master_addr:
        cmd.append("--standalone")  # private rendezvous on a free port: several single-node runs can share a host
    elif layout.rdzv_backend == "static":
        cmd += [f"--node-rank={layout.node_rank}", f"--master-addr={layout.master_addr}", f"--master-port={layout.master_port}"]
    else:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={layout.master_addr}:{layout.master_port}", f"--rdzv-id={layout.rdzv_id}"]
    # Every rank's output goes to files under log_dir (--tee 3 = stdout and stderr); the console shows log_ranks only.
    cmd += ["--role=rank", "--tee=3"]
    if log_dir:
        cmd.append(f"--log-dir={log_dir}")
    if log_ranks != "all":
        cmd.append(f"--local-ranks-filter={log_ranks}")
    if script:
        return cmd + [script, *([config] if config else []), *overrides]
    if not config:
        raise LaunchError("a config file is required (megarank launch CONFIG [section.key=value ...])")
    return cmd + ["-m", "megarank.cli", "train", config, *overrides]


# ----------------------------------------------------------------------------------------------- validation


def load_and_validate(config: str, overrides: Sequence[str], world_size: int):
    """Load the config with its overrides and check it against `world_size`; raise megarank.config.ConfigError.

    Checks that depend on this machine (CUDA, Transformer Engine) are skipped when megarank.config.validate
    offers that, because launches are planned on login nodes without GPUs.
    """
    from megarank.config import load_config, validate  # lazily: keeps `--help` and command building light

    cfg = load_config(config, list(overrides))
    params = inspect.signature(validate).parameters
    kwargs = {"check_environment": False} if "check_environment" in params else {}
    validate(cfg, world_size=world_size, **kwargs)
    return cfg


def config_yaml(cfg) -> str:
    import yaml

    from megarank.config import config_to_dict

    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def resolve_key(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not hasattr(node, part):
            raise LaunchError(f"--get {dotted}: {part} is not a config key")
        node = getattr(node, part)
    return node


def default_log_ranks(cfg, layout: Layout) -> str:
    """Local rank 0 plus the local rank that prints the training log lines.

    The trainer logs from the first rank of the last pipeline stage (TP rank 0, DP rank 0). megatron-core's
    default rank order (tp-cp-ep-dp-pp, PP outermost) puts it at global rank world - world/PP, which is not
    local rank 0 when PP > 1 on one node.
    """
    if cfg is None:
        return "0"
    pp = cfg.parallel.pipeline_model_parallel_size
    logging_rank = layout.world_size - layout.world_size // max(pp, 1)
    return ",".join(str(r) for r in sorted({0, logging_rank % layout.nproc}))


# ----------------------------------------------------------------------------------------------- CLI


def _env_int(name: str, default: Optional[int]) -> Optional[int]:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"environment variable {name} must be an integer (got {raw!r})") from None


def default_nproc() -> int:
    """Visible GPUs (CUDA_VISIBLE_DEVICES or torch), else 1 worker."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return max(len([d for d in visible.split(",") if d.strip()]), 1)
    try:
        import torch

        return max(torch.cuda.device_count(), 1)
    except Exception:  # torch missing or broken CUDA: the run itself will say more
        return 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megarank launch",
        description=__doc__.split("\n\n")[0],
        epilog="Environment: NPROC NNODES NODE_RANK MASTER_ADDR MASTER_PORT RDZV_ID RDZV_BACKEND LOG_RANKS LOG_DIR "
        "(flags override them).",
    )
    p.add_argument("config", nargs="?", help="YAML config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, passed on to megarank train")
    p.add_argument("--nproc", type=int, help="workers on this node [NPROC; default: visible GPUs, else 1]")
    p.add_argument("--nnodes", type=int, help="nodes [NNODES; 1]")
    p.add_argument("--node-rank", type=int, help="this node's rank, static rendezvous only [NODE_RANK; 0]")
    p.add_argument("--master-addr", help="rendezvous host [MASTER_ADDR]")
    p.add_argument("--master-port", type=int, help=f"rendezvous port [MASTER_PORT; {DEFAULT_PORT}]")
    p.add_argument("--rdzv-id", help="rendezvous id shared by all nodes [RDZV_ID; SLURM_JOB_ID; megarank]")
    p.add_argument("--rdzv-backend", choices=["c10d", "static"], help="[RDZV_BACKEND; c10d]")
    p.add_argument("--log-ranks", help='local ranks shown on the console: "0", "0,1" or "all" '
                   "[LOG_RANKS; 0 and the rank that logs training steps]")
    p.add_argument("--log-dir", help="write every rank's stdout/stderr under this folder [LOG_DIR]")
    p.add_argument("--dry-run", action="store_true", help="validate the config against the world size, print the resolved config and the command, run nothing")
    p.add_argument("--gpu-memory", type=float, metavar="GB", help="GPU memory the dry run's per-GPU estimate is "
                   "checked against, in GB [80: H100 80GB]")
    p.add_argument("--get", metavar="KEY", help="print one resolved config value (e.g. checkpoint.dir) and exit")
    p.add_argument("--script", help="run this Python script under torchrun instead of the trainer (e.g. launch/allreduce_check.py)")
    p.add_argument("--no-validate", action="store_true", help="skip the config check (e.g. megarank.config unavailable)")
    p.add_argument("--verbose", action="store_true", help="show the upstream warnings megarank hides, in the agent and "
                   "every worker [MEGARANK_VERBOSE=1]")
    return p


def layout_from(args: argparse.Namespace) -> Layout:
    def pick(flag, env, default):
        return flag if flag is not None else _env_int(env, default)

    nproc = pick(args.nproc, "NPROC", None)
    return Layout(
        nproc=nproc if nproc is not None else default_nproc(),
        nnodes=pick(args.nnodes, "NNODES", 1),
        node_rank=pick(args.node_rank, "NODE_RANK", 0),
        master_addr=args.master_addr or os.environ.get("MASTER_ADDR") or None,
        master_port=pick(args.master_port, "MASTER_PORT", DEFAULT_PORT),
        rdzv_id=args.rdzv_id or os.environ.get("RDZV_ID") or os.environ.get("SLURM_JOB_ID") or "megarank",
        rdzv_backend=args.rdzv_backend or os.environ.get("RDZV_BACKEND") or "c10d",
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `megarank launch ARGS` (argv excludes the word `launch`); returns the exit code (of
    --dry-run/--get, an error, or the torchrun agent this process then runs: ``run_agent``)."""
    try:
        args = parser().parse_intermixed_args(argv)
        if args.verbose:  # the agent and every worker show the upstream warnings (megarank/warnings_filter.py)
            from megarank.warnings_filter import show_known_warnings

            show_known_warnings(export=True)
        return _run(args)
    except LaunchError as e:
        print(f"megarank launch: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the agent runs (e.g. while torch imports); `python -m megarank.cli.launch`
        print("megarank launch: interrupted", file=sys.stderr, flush=True)
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.script:  # everything positional belongs to the script; there is no config to check
        args.overrides = [a for a in [args.config, *args.overrides] if a is not None]
        args.config = None
    elif args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        raise LaunchError(f"the first argument must be the config file, got the override {args.config!r}")
    layout = layout_from(args)
    layout.check()
    cfg = None
    if args.config and not args.no_validate:
        from megarank.config import ConfigError

        try:
            cfg = load_and_validate(args.config, args.overrides, layout.world_size)
        except ConfigError as e:
            where = f"{layout.nnodes} node(s) x {layout.nproc} worker(s)"
            print(f"megarank launch: {args.config} is not valid for world size {layout.world_size} ({where}):\n{e}", file=sys.stderr)
            return 2
    if args.get:
        if cfg is None:
            if args.config:
                raise LaunchError("--get needs the config validated (drop --no-validate)")
            print("")  # no config (e.g. --script): nothing to resolve
            return 0
        value = resolve_key(cfg, args.get)
        print("" if value is None else value)
        return 0
    cmd = build_command(
        args.config,
        args.overrides,
        layout,
        log_ranks=args.log_ranks or os.environ.get("LOG_RANKS") or default_log_ranks(cfg, layout),
        log_dir=args.log_dir or os.environ.get("LOG_DIR") or None,
        script=args.script,
    )
    if args.dry_run:
        if cfg is not None:
            tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
            cp = cfg.parallel.context_parallel_size
            dp = layout.world_size // (tp * pp * cp)
            print(f"# layout: world size {layout.world_size} = {layout.nnodes} node(s) x {layout.nproc} worker(s)"
                  f" = TP {tp} x PP {pp}{f' x CP {cp}' if cp > 1 else ''} x DP {dp}")
            from megarank.training.memory import report  # arithmetic on the config: no torch

            print("\n".join(report(cfg, dp, args.gpu_memory)))
            print("# resolved config:")
            print("\n".join(f"#   {line}" for line in config_yaml(cfg).rstrip().splitlines()))
        env = worker_env()
        if env:
            print("# worker environment: " + " ".join(f"{k}={v}" for k, v in env.items()))
        print(shlex.join(cmd))
        return 0
    env = worker_env()
    os.environ.update(env)  # inherited by the torchrun agent (this process) and its workers
    shown = "".join(f"{k}={v} " for k, v in env.items())
    print(f"megarank launch: {shown}{shlex.join(cmd)}", file=sys.stderr, flush=True)  # the log says what ran
    sys.stdout.flush()
    return run_agent(cmd[3:])  # cmd = [python, -m, torch.distributed.run, ARGS...]


# ----------------------------------------------------------------------------------------------- the agent

# torch's agent installs its own handler (SignalException) for these when it starts the workers; torchrun's
# --signals-to-handle sets them (torch/distributed/launcher/api.py:306, multiprocessing/api.py:536-546). SIGINT is
# left to AgentSignals. Default: "SIGTERM,SIGINT,SIGHUP,SIGQUIT".
AGENT_SIGNALS = "SIGTERM,SIGHUP,SIGQUIT"


class AgentSignals:
    """Ctrl-C for the torchrun agent that `megarank launch` runs in its own process.

    torchrun starts each worker in a session of its own, so a terminal's Ctrl-C reaches the agent only. The
    first one is torch's SIGINT path: ``SignalException`` in the agent, which forwards SIGINT to every worker's
    process group and waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30) before SIGKILL
    (torch/distributed/elastic/agent/server/api.py:752-756); the workers save at their next step boundary and
    exit 130 (megarank/training/preemption.py). On a second Ctrl-C torch's agent would send SIGTERM and wait the
    grace period again; this one SIGKILLs the workers' process groups (their per-save writer processes
    included) at once, so the run stops now: a save cut short leaves only a hidden temp folder, never a
    ``latest`` that names it. torch registers its own SIGINT handler when it starts the workers unless SIGINT
    is left out of torchrun's --signals-to-handle, which ``torchrun_args`` does (SIGTERM, SIGHUP and SIGQUIT
    stay torch's; a torch without that option keeps SIGINT too: then a second Ctrl-C is torch's SIGTERM, which
    the workers, already saving, let finish).
    """

    def __init__(self):
        self.interrupts = 0
        self._previous = None

    @staticmethod
    def torchrun_args(args: Sequence[str]) -> list[str]:
        """torchrun's arguments with SIGINT taken out of the signals torch's agent handles."""
        from torch.distributed.launcher.api import LaunchConfig

        if any(a.split("=")[0] in ("--signals-to-handle", "--signals_to_handle") for a in args):
            return list(args)  # chosen by hand (`megarank launch` never does)
        if "signals_to_handle" not in {f.name for f in dataclasses.fields(LaunchConfig)}:
            return list(args)  # an older torch: its agent handles SIGINT
        return [f"--signals-to-handle={AGENT_SIGNALS}", *args]

    def install(self) -> None:
        self._previous = signal.signal(signal.SIGINT, self._handler)

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handler(self, signum, frame) -> None:
        self.interrupts += 1
        if self.interrupts == 1:
            from torch.distributed.elastic.multiprocessing.api import SignalException

            raise SignalException(f"Process {os.getpid()} got signal: {signal.SIGINT}", sigval=signal.SIGINT)
        kill_workers()

    def line(self, sigval) -> str:
        if self.interrupts > 1:
            return "interrupted again: stopped the workers at once, without saving"
        if sigval == signal.SIGINT:
            return "interrupted"
        return f"stopped by {signal.Signals(sigval).name}"


def kill_workers() -> None:
    """SIGKILL every child of this process and its process group (a torchrun worker leads its own)."""
    import psutil

    for child in psutil.Process().children():
        try:
            if os.getpgid(child.pid) == child.pid:
                os.killpg(child.pid, signal.SIGKILL)
            else:
                child.kill()
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            pass


def run_agent(torchrun_args: Sequence[str]) -> int:
    """Run the torchrun agent in this process (``python -m torch.distributed.run ARGS``), so SLURM's and the
    shell's signals reach it directly and a stop ends in one line: ``megarank launch: interrupted`` (Ctrl-C) or
    ``megarank launch: stopped by SIGTERM``, exit code 128 + the signal, instead of the agent's traceback. The
    workers say what they saved. The agent's two routine shutdown log lines are dropped unless verbose
    (megarank/warnings_filter.py)."""
    from megarank.warnings_filter import quiet_agent_log_lines

    from torch.distributed.elastic.multiprocessing.api import SignalException  # a Ctrl-C before: KeyboardInterrupt
    from torch.distributed.run import main as torchrun_main

    quiet_agent_log_lines()
    # The workers' watchdog compares their parent with this pid (megarank/training/watchdog.py agent_pid).
    os.environ["MEGARANK_AGENT_PID"] = str(os.getpid())
    signals = AgentSignals()
    signals.install()
    try:
        torchrun_main(signals.torchrun_args(torchrun_args))
    except SignalException as e:
        print(f"megarank launch: {signals.line(e.sigval)}", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    finally:
        signals.restore()
    return 0


if __name__ == "__main__":
    sys.exit(main())
