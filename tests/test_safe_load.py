"""Loading a checkpoint never runs code it carries (issue 21; megarank/checkpoint/safe_pickle.py).

A hostile pickle -- an object whose ``__reduce__`` creates a marker file when it is unpickled -- is planted in
one checkpoint file, and the CRC manifest is rewritten to match (the manifest catches accidents, not an
adversary). Every load path must refuse it in one line naming the file and the refused global (``io.open``), exit
non-zero without a traceback where it is a command, and the marker must not exist afterwards:

- ``model/.metadata``: ``megarank evaluate``, ``megarank train checkpoint.load=``, ``Reranker.from_checkpoint``
  (a step folder and a run folder), ``megarank-convert megatron-to-hf`` and ``verify``;
- ``model/common.pt``: ``megarank rerank``, with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``, which turns off the
  ``weights_only`` default megatron's own reader relies on;
- a resume: ``optimizer/common.pt`` (``megarank train``, with that variable too), ``optimizer/.metadata`` and
  ``train_state/rank-0.pt`` (``load_training_checkpoint`` in this process);
- a Hugging Face ``pytorch_model.bin`` given ``--allow-pickle``;
- an object stored inside a ``.distcp`` file (how Transformer Engine's ``_extra_state`` is saved), and the bytes
  TE itself unpickles from it.

The controls show the payload is live: torch's own DCP reader runs it, and so would megatron's object loader.
Normal checkpoints loading on every path is what the other checkpoint tests check (and Reranker here).
"""
from __future__ import annotations

import io
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from checkpoint_tools.cli import main as convert
from megarank.checkpoint import CheckpointError, write_manifest
from megarank.checkpoint import safe_pickle
from megarank.data import sample_data_dir
from tests.helpers_hf import make_hf_llama
from tests.training_harness import megarank_cmd, run, run_env, train_cmd

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
SAMPLE = str(sample_data_dir())
REFUSED = "io.open"  # what the payload calls


class Payload:
    """Creates ``marker`` when unpickled (``open(marker, "w")``)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(folder: Path, rel: str, marker: Path) -> Path:
    """Replace ``folder/rel`` by a hostile pickle (a ``torch.save`` zip for ``.pt`` files) and rewrite the manifest."""
    path = folder / rel
    assert path.is_file(), path
    if path.suffix == ".pt":
        torch.save({"state": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))
    write_manifest(folder)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny training run saved at step 2 (``run/step-2``), a Hugging Face Llama and its conversion (``mg``)."""
    root = tmp_path_factory.mktemp("safe_load")
    run(train_cmd(1, "train.steps=2", "checkpoint.save_interval=2", f"checkpoint.dir={root / 'run'}"), cwd=root)
    hf = make_hf_llama(root / "hf", "llama_bidirec", seed=3, vocab_size=301)
    assert convert(["hf-to-megatron", str(hf), str(root / "mg"), "--quiet"]) == 0
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("tensorboard", ".lock"))
    return dst


def _one_line_refusal(output: str, prog: str, path: Path) -> None:
    assert "Traceback" not in output, output[-3000:]
    errors = [ln for ln in output.splitlines() if ln.startswith(prog) and "error" in ln]
    assert len(errors) == 1, output[-3000:]
    assert str(path) in errors[0] and REFUSED in errors[0], errors[0]


def _run_jobs(jobs: dict, cwd: Path, timeout: float = 240) -> dict:
    """{name: (cmd, env)} run two at a time, whatever their exit codes -> {name: (returncode, output)}."""
    pending, running, done = list(jobs.items()), {}, {}
    deadline = time.monotonic() + timeout
    while pending or running:
        while pending and len(running) < 2:
            name, (cmd, env) = pending.pop(0)
            out = tempfile.TemporaryFile("w+")
            running[name] = (subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True), out)
        for name, (proc, out) in list(running.items()):
            if proc.poll() is not None:
                out.seek(0)
                done[name] = (proc.returncode, out.read())
                out.close()
                del running[name]
        if time.monotonic() > deadline:
            for proc, _ in running.values():
                proc.kill()
            raise AssertionError(f"{sorted(running)} still running after {timeout:.0f}s")
        time.sleep(0.05)
    return done


def test_the_payload_is_live_torch_dcp_reader_runs_it(work, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    folder = _copy(work / "mg", tmp_path / "mg")
    marker = tmp_path / "ran"
    plant(folder, "model/.metadata", marker)
    try:
        FileSystemReader(str(folder / "model")).read_metadata()  # plain pickle.load (filesystem.py:930)
    except Exception:  # noqa: BLE001 - what it returns is no Metadata; what matters is that it ran
        pass
    assert marker.exists()


def test_every_command_refuses_a_hostile_pickle_in_one_line_without_running_it(work, tmp_path):
    cases = {  # name: (folder copied, planted file, prog, command builder, env)
        "evaluate": ("step", "model/.metadata", "megarank evaluate",
                     lambda ck: megarank_cmd(1, "evaluate", str(ck), "--data", SAMPLE, "--max-queries", "2"), {}),
        "rerank": ("step", "model/common.pt", "megarank rerank",
                   lambda ck: megarank_cmd(1, "rerank", str(ck), "--data", SAMPLE, "--max-queries", "2",
                                           "--out", str(tmp_path / "run.trec")),
                   {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}),
        "checkpoint.load": ("step", "model/.metadata", "megarank train",
                            lambda ck: train_cmd(1, "train.steps=1", f"checkpoint.load={ck}",
                                                 f"checkpoint.dir={tmp_path / 'fresh'}"), {}),
        "resume": ("run", "optimizer/common.pt", "megarank train",
                   lambda rd: train_cmd(1, "train.steps=3", f"checkpoint.dir={rd}"), {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}),
    }
    jobs, expected = {}, {}
    for i, (name, (kind, rel, prog, cmd, env)) in enumerate(cases.items()):
        run_dir = _copy(work / "run", tmp_path / f"run{i}")
        target = run_dir if kind == "run" else run_dir / "step-2"
        marker = tmp_path / f"ran{i}"
        path = plant(run_dir / "step-2", rel, marker)
        jobs[name] = (cmd(target), run_env(**env))
        expected[name] = (prog, path, marker)
    for name, (code, output) in _run_jobs(jobs, tmp_path).items():
        prog, path, marker = expected[name]
        assert code != 0, f"{name}:\n{output[-3000:]}"
        _one_line_refusal(output, prog, path)
        assert not marker.exists(), name
    assert not (tmp_path / "run.trec").exists()


def test_the_converters_refuse_a_hostile_pickle_in_one_line_without_running_it(work, tmp_path, capsys, one_rank):
    step = _copy(work / "run" / "step-2", tmp_path / "step")
    converted = _copy(work / "mg", tmp_path / "mg")
    marker = tmp_path / "ran"
    for args, folder in ((["megatron-to-hf", str(step), str(tmp_path / "hf")], step),
                         (["verify", str(work / "hf"), str(converted)], converted)):
        path = plant(folder, "model/.metadata", marker)
        capsys.readouterr()
        assert convert(args) == 2
        err = capsys.readouterr().err
        _one_line_refusal(err, f"megarank-convert {args[0]}", path)
        assert not marker.exists(), args[0]
    assert not (tmp_path / "hf").exists()


def test_a_hostile_hf_bin_is_refused_even_with_allow_pickle(work, tmp_path, capsys):
    hf = _copy(work / "hf", tmp_path / "hf")
    for f in hf.glob("*.safetensors*"):
        f.unlink()
    marker = tmp_path / "ran"
    torch.save({"model.embed_tokens.weight": Payload(marker)}, hf / "pytorch_model.bin")
    assert convert(["hf-to-megatron", str(hf), str(tmp_path / "mg"), "--allow-pickle", "--quiet"]) == 2
    _one_line_refusal(capsys.readouterr().err, "megarank-convert hf-to-megatron", hf / "pytorch_model.bin")
    assert not marker.exists() and not (tmp_path / "mg").exists()


def test_reranker_refuses_a_hostile_checkpoint_and_still_loads_a_normal_one(work, tmp_path, one_rank):
    from megarank import Reranker

    normal = Reranker.from_checkpoint(work / "run" / "step-2", dtype="fp32")
    assert normal.score([("q", "p")]).shape[0] == 1
    normal.close()
    run_dir = _copy(work / "run", tmp_path / "run")
    marker = tmp_path / "ran"
    path = plant(run_dir / "step-2", "model/.metadata", marker)
    for source in (run_dir / "step-2", run_dir):
        with pytest.raises(CheckpointError, match=rf"^{path} refers to {REFUSED}, "):
            Reranker.from_checkpoint(source, dtype="fp32")
    assert not marker.exists()


class _NothingToRestore:
    """The OptimizerState protocol (megarank/checkpoint/train_state.py) of an optimizer that is never reached: the
    refusal comes first."""

    def sharded_state_dict(self, is_loading: bool, saved_keys=None) -> dict:
        return {}

    def restore(self, loaded: dict) -> None:
        raise AssertionError("a refused checkpoint restored optimizer state")

    def reload_model_params(self) -> None:
        raise AssertionError("a refused checkpoint reached the optimizer")


@pytest.mark.parametrize("rel", ["optimizer/.metadata", "train_state/rank-0.pt"])
def test_a_resume_refuses_hostile_optimizer_metadata_and_train_state(work, tmp_path, one_rank, rel):
    """What a resume reads after the weights (``load_training_checkpoint``, which ``RunCheckpoints.restore`` calls;
    ``optimizer/common.pt`` is refused by a real resume above)."""
    from megarank import Reranker
    from megarank.checkpoint import load_training_checkpoint

    step = _copy(work / "run" / "step-2", tmp_path / "step-2")
    marker = tmp_path / "ran"
    path = plant(step, rel, marker)
    model = Reranker.from_checkpoint(work / "run" / "step-2", dtype="fp32").model
    optimizer_state = _NothingToRestore() if rel.startswith("optimizer") else None
    with pytest.raises(CheckpointError, match=rf"^{path} refers to {REFUSED}, "):
        load_training_checkpoint(step, model, optimizer_state)
    assert not marker.exists()


def test_an_object_in_a_distcp_file_and_te_extra_state_are_read_through_the_allow_list(tmp_path, one_rank):
    """Objects (Transformer Engine's ``_extra_state``) are stored inside ``.distcp`` files and read by DCP's
    planner with ``torch.load(weights_only=False)``; the bytes TE gets from them it unpickles with plain pickle."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    from megarank.checkpoint.writer import keep_writer_in_process

    def sharded(obj):
        return {"w": ShardedTensor.from_rank_offsets("w", torch.ones(4), replica_id=0),
                "layer._extra_state": ShardedObject("layer._extra_state", obj, (1,), (0,), replica_id=0)}

    keep_writer_in_process()
    marker = tmp_path / "ran"
    folder = tmp_path / "objects"
    folder.mkdir()
    dist_checkpointing.save(sharded(Payload(marker)), str(folder))
    with pytest.raises(CheckpointError, match=rf"^{folder}.* \(object layer._extra_state.*\) refers to {REFUSED}, "):
        safe_pickle.load(sharded(None), folder)
    assert not marker.exists()
    # control: megatron's own loader unpickles it with weights_only=False (torch's default_planner.py:382-392)
    dist_checkpointing.load(sharded(None), str(folder))["layer._extra_state"].close()
    assert marker.exists()

    # the bytes Transformer Engine unpickles: its state (tensors, builtins) passes, anything else is refused
    state = {"scale_fwd": torch.ones(3), "amax_history_fwd": torch.zeros(4, 3),
             "extra_fp8_variables": {"num_gemms": 1, "fp8_checkpoint": True}}
    as_tensor = lambda obj: torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)  # TE's format
    safe_pickle.check_extra_state(as_tensor(state), "x")
    safe_pickle.check_extra_state(torch.empty(0, dtype=torch.uint8), "x")  # no FP8 state
    marker.unlink()
    with pytest.raises(CheckpointError, match=rf"^where refers to {REFUSED}, "):
        safe_pickle.check_extra_state(as_tensor({**state, "recipe": Payload(marker)}), "where")
    assert not marker.exists()


def test_te_extra_state_may_hold_the_recipe_classes_of_transformer_engine_and_nothing_else(monkeypatch, tmp_path):
    """Transformer Engine is not installed here: its recipe module is stood in for by one that defines what TE's
    does (a dataclass recipe, an enum format, a named tuple) and a function, which a recipe must not carry."""
    import dataclasses
    import enum
    import types
    from typing import NamedTuple

    name = "transformer_engine.common.recipe"
    recipe = types.ModuleType(name)
    Format = enum.Enum("Format", "E4M3 HYBRID", module=name)
    Precision = NamedTuple("Precision", [("fprop", bool)])
    Precision.__module__ = name

    @dataclasses.dataclass
    class DelayedScaling:
        fp8_format: object = None
        override_linear_precision: object = None
        amax_compute_algo: object = "max"

    def algo(history):
        return history

    for obj in (DelayedScaling, algo):
        obj.__module__, obj.__qualname__ = name, obj.__name__
    recipe.Format, recipe.Precision, recipe.DelayedScaling, recipe.algo = Format, Precision, DelayedScaling, algo
    for parent in ("transformer_engine", "transformer_engine.common"):  # pickle imports the module by name
        monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    monkeypatch.setitem(sys.modules, name, recipe)
    as_tensor = lambda obj: torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)

    state = {"recipe": DelayedScaling(Format.HYBRID, Precision(False)), "scale_fwd": torch.ones(2)}
    safe_pickle.check_extra_state(as_tensor(state), "x")
    with pytest.raises(CheckpointError, match=rf"^x refers to {name}.algo, "):
        safe_pickle.check_extra_state(as_tensor({"recipe": DelayedScaling(amax_compute_algo=algo)}), "x")


def test_the_allow_lists_read_real_checkpoint_files_and_nothing_else(work):
    import importlib
    from types import SimpleNamespace

    from torch.distributed.checkpoint.metadata import Metadata

    for rel in ("run/step-2/model", "run/step-2/optimizer", "mg/model"):
        assert isinstance(safe_pickle.load_metadata(work / rel / ".metadata"), Metadata)
    for module, name in (("builtins", "eval"), ("posix", "system"), ("torch", "load"), ("pathlib", "Path")):
        hostile = f"c{module}\n{name}\n.".encode()  # protocol 0: one GLOBAL, resolved through find_class
        with pytest.raises(CheckpointError, match=rf"^f refers to {module}.{name}, "):
            safe_pickle.MetadataUnpickler(io.BytesIO(hostile), "f").load()
    # BUILD on an allowed class (protocol 0: the class, a (None, {attribute: value}) state tuple, BUILD)
    poison = b"ctorch.distributed.checkpoint.metadata\nMetadata\n(N(S'version'\nS'x'\ndtb."
    with pytest.raises(CheckpointError, match=r"^f sets attributes of the class torch.distributed.checkpoint.metadata.Metadata"):
        safe_pickle.MetadataUnpickler(io.BytesIO(poison), "f").load()
    assert Metadata.version is None  # the dataclass default, unchanged

    other_backend = shutil.copytree(work / "mg" / "model", work / "zarr_model")  # metadata.json names the backend
    (other_backend / "metadata.json").write_text('{"sharded_backend": "zarr", "sharded_backend_version": 1, '
                                                  '"common_backend": "torch", "common_backend_version": 1}')
    with pytest.raises(CheckpointError, match="stored by torch_dist, not zarr"):
        safe_pickle.load_tensors_metadata(other_backend)

    for rel in ("model/common.pt", "optimizer/common.pt", "train_state/rank-0.pt"):
        safe_pickle.torch_load(work / "run" / "step-2" / rel)
    # torch's own list only: importing megatron-core adds SimpleNamespace to it (megatron/core/safe_globals.py)
    importlib.import_module("megatron.core")
    assert SimpleNamespace in torch.serialization.get_safe_globals()
    with pytest.raises(CheckpointError, match=r"^f refers to types.SimpleNamespace, "):
        safe_pickle.torch_load(io.BytesIO(_saved({"ns": SimpleNamespace(a=1)})), where="f")
    assert SimpleNamespace in torch.serialization.get_safe_globals()  # restored after the read


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()
