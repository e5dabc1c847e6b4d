"""Quiet by default: the known upstream warnings (megarank/warnings_filter.py) are hidden in `megarank` and
`megarank-convert`, each matched by text + category + module (never a whole category), and shown again with
``--verbose``, ``MEGARANK_VERBOSE=1`` or ``logging.level=DEBUG``. Real `megarank train` and `megarank-convert verify`
processes, and each filter against the text, category and module the libraries really use."""
from __future__ import annotations

import importlib
import logging
import sys
import warnings
from pathlib import Path

import pytest

from megarank.warnings_filter import (KNOWN_WARNINGS, quiet_known_warnings, show_known_warnings,
                                      verbose_requested)
from tests.helpers_hf import make_hf_llama
from tests.training_harness import run_many, train_cmd

# What megatron-core 0.16.1 and torch 2.13 print on CPU (text, category, the module it is attributed to).
SEEN = [
    ("full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer.", UserWarning,
     "megatron.core.transformer.transformer_config"),
    ("The .grad attribute of a Tensor that is not a leaf Tensor is being accessed. Its .grad attribute won't be "
     "populated during autograd.backward(). If you indeed want the .grad field to be populated for a non-leaf "
     "Tensor, use .retain_grad() on the non-leaf Tensor.", UserWarning, "megatron.core.optimizer.optimizer"),
    ("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", UserWarning,
     "megatron.core.optimizer"),
    ("Transformer Engine and Apex are not installed. Falling back to local implementations of multi_tensor_applier "
     "and multi_tensor_scale", UserWarning, "megatron.core.distributed.fsdp.src.megatron_fsdp.mixed_precision"),
    ("Apex is not installed. Falling back to Torch Norm", UserWarning, "megatron.core.models.gpt.gpt_layer_specs"),
    ("`load_state_dict` is deprecated and will be removed in future versions. Please use `load` instead.",
     FutureWarning, "megatron.core.dist_checkpointing.strategies.torch"),
    ("Please use DTensor instead and we are deprecating ShardedTensor.", FutureWarning,
     "torch.distributed.checkpoint.planner_helpers"),
    ("Please use DTensor instead and we are deprecating ShardedTensor.", FutureWarning,
     "torch.distributed.checkpoint.default_planner"),
    ("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use `torch.distributed.reduce_scatter_single` "
     "instead.", FutureWarning, "torch.distributed.c10d_logger"),
    ("`torch.distributed.all_gather_into_tensor` is deprecated. Please use `torch.distributed.all_gather_single` "
     "instead.", FutureWarning, "torch.distributed.c10d_logger"),
]
# Near misses that must still show: another module, another category, another text from the same module.
NOT_HIDDEN = [
    ("full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer.", UserWarning, "megarank.model"),
    ("Apex is not installed. Falling back to Torch Norm", RuntimeWarning, "megatron.core.models.backends"),
    ("`load_state_dict` is deprecated and will be removed in future versions.", DeprecationWarning,
     "megatron.core.dist_checkpointing.strategies.torch"),
    ("Some other planner change.", FutureWarning, "torch.distributed.checkpoint.default_planner"),
    ("When using sequence parallelism it is recommended to set CUDA_DEVICE_MAX_CONNECTIONS", UserWarning,
     "megatron.core.tensor_parallel.layers"),
]
# One line of each, as the processes print it (file:line: Category: text).
TRAIN_LINES = ["UserWarning: full scope is deprecated", "UserWarning: The .grad attribute of a Tensor that is not a leaf",
               "UserWarning: Apex is not installed", "UserWarning: Transformer Engine and Apex are not installed"]
VERIFY_LINES = ["UserWarning: full scope is deprecated", "UserWarning: Apex is not installed",
                "FutureWarning: `load_state_dict` is deprecated", "FutureWarning: Please use DTensor instead"]


def _shown(seen) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_warnings({})
        for text, category, module in seen:
            warnings.warn_explicit(text, category, f"/{module.replace('.', '/')}.py", 1, module=module)
        before = [str(w.message) for w in caught]
        caught.clear()
        show_known_warnings(export=False)
        for text, category, module in seen:
            warnings.warn_explicit(text, category, f"/{module.replace('.', '/')}.py", 2, module=module)
        return before, [str(w.message) for w in caught]


def test_each_known_warning_is_hidden_by_text_category_and_module_and_shown_when_verbose():
    hidden, verbose = _shown(SEEN)
    assert hidden == [] and verbose == [text for text, _, _ in SEEN]
    shown, _ = _shown(NOT_HIDDEN)
    assert shown == [text for text, _, _ in NOT_HIDDEN]
    for known in KNOWN_WARNINGS:
        assert known.why and known.module and known.category in (UserWarning, FutureWarning), known
    assert verbose_requested({"MEGARANK_VERBOSE": "1"}) and not verbose_requested({"MEGARANK_VERBOSE": "0"})
    assert not verbose_requested({})


def _lines(out: str, wanted: list[str]) -> list[str]:
    return [w for w in wanted if w in out]


def test_train_is_quiet_by_default_and_shows_them_with_verbose(tmp_path):
    args = ["train.steps=3", "train.log_interval=1"]
    out = run_many({"quiet": (1, train_cmd(1, *args)), "verbose": (1, train_cmd(1, *args, "--verbose"))}, cwd=tmp_path)
    assert "step 3/3" in out["quiet"] and _lines(out["quiet"], TRAIN_LINES) == [], out["quiet"][-3000:]
    assert "Warning:" not in out["quiet"], out["quiet"][-3000:]
    assert _lines(out["verbose"], TRAIN_LINES) == TRAIN_LINES, out["verbose"][-3000:]


def test_logging_level_debug_shows_them_too():
    """`megarank train` sets up logging from the config (logging.level) before megatron-core is imported."""
    cli = importlib.import_module("megarank.cli.main")
    text, category, module = SEEN[0]
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cli._quiet_warnings()
            cli._setup_logging("INFO")
            warnings.warn_explicit(text, category, "x.py", 1, module=module)
            assert caught == []
            cli._setup_logging("DEBUG")
            warnings.warn_explicit(text, category, "x.py", 2, module=module)
            assert [str(w.message) for w in caught] == [text]
    finally:  # _setup_logging configures this process's root logger: leave it as pytest had it
        root.handlers[:] = handlers
        root.setLevel(level)


def test_convert_verify_answers_first_and_shows_the_warnings_when_verbose(tmp_path):
    from checkpoint_tools.cli import main

    src = make_hf_llama(tmp_path / "hf", "causal_lm", seed=8)
    with warnings.catch_warnings():
        assert main(["hf-to-megatron", str(src), str(tmp_path / "mg"), "--quiet"]) == 0
    script = Path(sys.executable).with_name("megarank-convert")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "checkpoint_tools"]
    verify = [*cmd, "verify", str(src), str(tmp_path / "mg")]
    jobs = {"quiet": (1, verify), "verbose": (1, ["env", "MEGARANK_VERBOSE=1", *verify])}
    out = run_many(jobs, cwd=tmp_path)
    # the answer is all there is: its first line is the first line printed
    assert out["quiet"].splitlines()[0].startswith(f"verify {src} vs "), out["quiet"][:3000]
    assert "Warning:" not in out["quiet"] and out["quiet"].rstrip().endswith("OK"), out["quiet"][-3000:]
    assert _lines(out["verbose"], VERIFY_LINES) == VERIFY_LINES, out["verbose"][:4000]
    assert out["verbose"].rstrip().endswith("OK")


@pytest.fixture(autouse=True)
def _no_verbose_in_env(monkeypatch):
    """Whatever the calling shell says, these tests decide verbosity themselves."""
    monkeypatch.delenv("MEGARANK_VERBOSE", raising=False)
    yield

