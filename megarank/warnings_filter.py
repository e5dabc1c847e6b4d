"""The upstream warnings megarank hides, each with why; shown again with ``--verbose`` / ``MEGARANK_VERBOSE=1``.

Every entry names the warning's text (a regex matched at its start, case-insensitive), its category and the
module it is attributed to (a regex matched at the start of the module name: the frame ``warnings.warn`` points
at, so for a warning raised with ``stacklevel=2`` that is the caller). Nothing is hidden by category alone, so a
new warning from the same libraries still shows. Both entry points install them before any heavy import:
``megarank`` (``megarank/cli/main.py``; torchrun workers run ``python -m megarank.cli``, so every rank has them)
and ``megarank-convert`` (``checkpoint_tools/cli.py``).

Verbose (the warnings shown as Python prints them by default): ``megarank --verbose CMD ...`` (any position),
``MEGARANK_VERBOSE=1`` in the environment (inherited by torchrun workers and quickstart steps), or
``logging.level=DEBUG`` in a training config. Each was seen with megatron-core 0.16.1 and torch 2.13 on CPU;
``tests/test_quiet.py`` checks each still matches what the libraries print, and that a real run prints none.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from typing import Mapping, Optional

VERBOSE_ENV = "MEGARANK_VERBOSE"


@dataclasses.dataclass(frozen=True)
class Known:
    message: str  # regex, matched at the start of the warning's text (case-insensitive)
    category: type
    module: str  # regex, matched at the start of the module the warning is attributed to
    why: str


KNOWN_WARNINGS = (
    Known(r"full scope is deprecated\. Use empty cuda_graph_scope", UserWarning,
          r"megatron\.core\.transformer\.transformer_config$",
          "megatron-core 0.16.1's own default (TransformerConfig.cuda_graph_scope = 'full') triggers its own "
          "deprecation on every TransformerConfig built: every command that builds a model prints it; megarank "
          "uses no CUDA graphs"),
    Known(r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed", UserWarning,
          r"megatron\.core\.optimizer\.optimizer$",
          "megatron's _zero_grad_group_helper (optimizer.py:66) probes hasattr(param, 'grad') on every tensor of a "
          "parameter group, some of which are views (non-leaf); torch warns on that read, once per training run. "
          "Nothing is lost: megatron sets those gradients itself"),
    Known(r"(Transformer Engine and Apex are|Apex is) not installed", UserWarning, r"megatron\.core\.",
          "megatron-core imports warn that the fused kernels of Transformer Engine / Apex are absent (normal on CPU "
          "and for the converters, up to 6 lines per process); the GPU path checks for Transformer Engine itself "
          "(megarank/model/spec.py, docs/gpu.md)"),
    Known(r"`load_state_dict` is deprecated and will be removed", FutureWarning,
          r"megatron\.core\.dist_checkpointing\.",
          "megatron's torch_dist loader calls torch.distributed.checkpoint.load_state_dict, deprecated in favour of "
          "load; every checkpoint load (evaluate, verify, resume, converters) prints it"),
    Known(r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning,
          r"torch\.distributed\.checkpoint\.",
          "megatron's torch_dist format is built on ShardedTensor; torch's checkpoint planner warns while reading "
          "one (twice per load)"),
    Known(r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated", FutureWarning,
          r"torch\.distributed\.c10d_logger$",
          "megatron's DDP buffers and distributed optimizer call the collectives torch 2.13 renamed (*_single); "
          "the warning is attributed to torch's logging wrapper around them"),
)

# Log records (not warnings) of the torchrun agent that `megarank launch` runs in its own process: on Ctrl-C and
# SIGTERM the agent logs what it does next, and megarank's launcher says it in one line instead.
KNOWN_AGENT_LOG_LINES = (
    ("torch.distributed.elastic.agent.server.api", "Received %s death signal, shutting down workers"),
    ("torch.distributed.elastic.multiprocessing.api", "Sending process %s closing signal %s"),
)


def verbose_requested(environ: Optional[Mapping[str, str]] = None) -> bool:
    """True when MEGARANK_VERBOSE is set to anything but empty or 0."""
    environ = os.environ if environ is None else environ
    return environ.get(VERBOSE_ENV, "").strip() not in ("", "0")


def _add(action: str) -> None:
    for known in reversed(KNOWN_WARNINGS):  # each insert goes first: keep the table's order
        warnings.filterwarnings(action, message=known.message, category=known.category, module=known.module)


def quiet_known_warnings(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Hide the known upstream warnings unless verbose was asked for; -> whether they are hidden."""
    if verbose_requested(environ):
        return False
    _add("ignore")
    return True


def show_known_warnings(export: bool = True) -> None:
    """Show them again (Python's default action: once per place), overriding filters installed earlier; with
    ``export``, child processes (torchrun workers, quickstart steps) show them too."""
    if export:
        os.environ[VERBOSE_ENV] = "1"
    _add("default")


class _DropKnownLines(logging.Filter):
    def __init__(self, template: str):
        super().__init__()
        self.template = template

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != self.template


def quiet_agent_log_lines(environ: Optional[Mapping[str, str]] = None) -> None:
    """Drop the torchrun agent's known shutdown lines (unless verbose); other agent warnings (e.g. a worker that
    had to be SIGKILLed) still show."""
    if verbose_requested(environ):
        return
    for name, template in KNOWN_AGENT_LOG_LINES:
        logging.getLogger(name).addFilter(_DropKnownLines(template))
