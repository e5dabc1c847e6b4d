"""Checksummed checkpoints: a damaged file is found and named by every command that reads it.

- unit level (no process group): the manifest names a changed, truncated or missing file; a damaged or
  incomplete ``latest`` step falls back to the newest intact one with a warning; garbage in ``latest``, a
  missing train-state file and a config.yaml that was edited are one-sentence errors naming the file;
- real `megarank` / `megarank-convert` processes on one tiny training run (steps 2 and 4): random bytes in the
  middle of a model shard, and a truncated shard, make evaluate, rerank, megatron-to-hf and
  `train checkpoint.load=` refuse with a one-line message naming the file; resuming the run falls back to
  step 2, trains on, and the save that follows removes an old ``.step-N.incomplete`` folder; NaN weights (with
  a valid manifest) are refused naming the tensor by evaluate and megatron-to-hf; a config.yaml that contradicts its tensors and a
  non-existent checkpoint.load are named.
"""
import json
import logging
import os
import shutil
import sys

import pytest

from megarank.checkpoint import CheckpointError, latest_checkpoint, resolve_checkpoint, write_manifest
from megarank.checkpoint.integrity import MANIFEST, verify_checkpoint_files
from megarank.data import sample_data_dir
from tests.training_harness import TINY, megarank_cmd, run, train_cmd

SAMPLE = sample_data_dir()


def _corrupt(path) -> None:
    """Random bytes in the middle of a file (same size)."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(min(64, size - size // 2)))


def _truncate(path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


DAMAGE = {"corrupted": _corrupt, "truncated": _truncate}


# ----------------------------------------------------------------------------------------------- unit level


def _fake_step(run_dir, step: int):
    """A step folder with a marker, a config, a shard and a manifest (enough for the file checks)."""
    d = run_dir / f"step-{step}"
    (d / "model").mkdir(parents=True)
    (d / "model" / "metadata.json").write_text("{}")
    (d / "model" / "__0_0.distcp").write_bytes(os.urandom(4096))
    (d / "config.yaml").write_text("model: {}\n")
    (d / "megarank_checkpoint.json").write_text(json.dumps({"kind": "train", "step": step, "world_size": 1}))
    write_manifest(d)
    return d


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_the_manifest_names_a_damaged_file_and_latest_falls_back_to_the_newest_intact_step(tmp_path, kind, caplog):
    old, new = _fake_step(tmp_path, 2), _fake_step(tmp_path, 4)
    (tmp_path / "latest").write_text("step-4\n")
    verify_checkpoint_files(new)  # intact
    shard = new / "model" / "__0_0.distcp"
    DAMAGE[kind](shard)
    with pytest.raises(CheckpointError, match=rf"^{shard} is (damaged|truncated)"):
        verify_checkpoint_files(new)
    with pytest.raises(CheckpointError, match=str(shard)):
        resolve_checkpoint(new)
    with caplog.at_level(logging.WARNING, logger="megarank.checkpoint"):
        assert latest_checkpoint(tmp_path) == old
        assert resolve_checkpoint(tmp_path) == old
    assert any(str(shard) in r.getMessage() and f"using {old}" in r.getMessage() for r in caplog.records)
    DAMAGE[kind](old / "model" / "__0_0.distcp")
    with pytest.raises(CheckpointError, match=rf"{tmp_path}/latest points at {new}, .*{shard}.* holds no other intact step"):
        latest_checkpoint(tmp_path)


def test_a_missing_file_an_unfinished_step_and_a_damaged_manifest_are_named(tmp_path, caplog):
    old, new = _fake_step(tmp_path, 2), _fake_step(tmp_path, 4)
    (new / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match=rf"^{new / 'config.yaml'} is missing \(listed in {new / MANIFEST}\)$"):
        verify_checkpoint_files(new)
    (new / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"^{new / MANIFEST} is damaged"):
        verify_checkpoint_files(new)
    # a folder that `latest` names but that never got its marker (killed save of an older version): fall back
    (tmp_path / "latest").write_text("step-6\n")
    with caplog.at_level(logging.WARNING, logger="megarank.checkpoint"):
        assert latest_checkpoint(tmp_path) == old
    assert any("step-6 does not exist" in r.getMessage() for r in caplog.records)


def test_a_folder_without_manifest_loads_with_a_warning(tmp_path, caplog):
    d = _fake_step(tmp_path, 1)
    (d / MANIFEST).unlink()
    with caplog.at_level(logging.WARNING, logger="megarank.checkpoint"):
        verify_checkpoint_files(d)
    assert any("not verified" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("content", [b"\x00\xff garbage\n", b"step-x\n", b"../../etc\n", b""])
def test_garbage_in_latest_is_one_sentence_naming_the_file_and_the_intact_step(tmp_path, content):
    _fake_step(tmp_path, 3)
    (tmp_path / "latest").write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        latest_checkpoint(tmp_path)
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'latest'} holds ") and "not the name of a step folder" in message
    assert "step-3" in message and "\n" not in message


def test_a_missing_train_state_file_is_named(tmp_path):
    from megarank.checkpoint import load_train_state

    d = _fake_step(tmp_path, 5)
    with pytest.raises(CheckpointError, match=rf"^{d / 'train_state' / 'rank-0.pt'} is missing: {d} is incomplete$"):
        load_train_state(d)
    (d / "train_state").mkdir()
    (d / "train_state" / "rank-0.pt").write_bytes(os.urandom(100))
    with pytest.raises(CheckpointError, match=r"rank-0.pt is damaged and cannot be read"):
        load_train_state(d)


# ----------------------------------------------------------------------------------------------- real commands


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4 steps of the tiny config, saved at steps 2 and 4 (one process)."""
    work = tmp_path_factory.mktemp("integrity")
    run(train_cmd(1, "train.steps=4", "checkpoint.save_interval=2", "checkpoint.keep_last=0",
                  f"checkpoint.dir={work / 'run'}"), cwd=work)
    return work


def _copy_run(trained, tmp_path):
    shutil.copytree(trained / "run", tmp_path / "run", ignore=shutil.ignore_patterns("tensorboard"))
    return tmp_path / "run"


def _one_line_error(proc, prog: str, *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    errors = [ln for ln in proc.stdout.splitlines() if ln.startswith(f"{prog}") and "error" in ln]
    assert len(errors) == 1, proc.stdout[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _reading_commands(step_dir, tmp_path) -> dict:
    return {
        "evaluate": ("megarank evaluate", megarank_cmd(1, "evaluate", str(step_dir), "--data", str(SAMPLE),
                                                       "--max-queries", "2")),
        "rerank": ("megarank rerank", megarank_cmd(1, "rerank", str(step_dir), "--data", str(SAMPLE),
                                                   "--max-queries", "2", "--out", str(tmp_path / "run.trec"))),
        "megatron-to-hf": ("megarank-convert", [sys.executable, "-m", "checkpoint_tools", "megatron-to-hf",
                                                str(step_dir), str(tmp_path / "hf")]),
        "train checkpoint.load": ("megarank train", train_cmd(1, "train.steps=1", f"checkpoint.load={step_dir}")),
    }


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_every_command_that_reads_a_damaged_shard_refuses_naming_it(trained, tmp_path, kind):
    run_dir = _copy_run(trained, tmp_path)
    step_dir = run_dir / "step-4"
    shard = step_dir / "model" / "__0_0.distcp"
    DAMAGE[kind](shard)
    for name, (prog, cmd) in _reading_commands(step_dir, tmp_path).items():
        proc = run(cmd, cwd=tmp_path, check=False)
        _one_line_error(proc, prog, str(shard))
    assert not (tmp_path / "run.trec").exists() and not (tmp_path / "hf").exists()


def test_resume_skips_a_damaged_latest_step_and_the_next_save_cleans_up(trained, tmp_path):
    run_dir = _copy_run(trained, tmp_path)
    shard = run_dir / "step-4" / "optimizer" / "__0_0.distcp"
    _corrupt(shard)
    (run_dir / ".step-1.incomplete" / "model").mkdir(parents=True)  # left by a save killed long ago
    out = run(train_cmd(1, "train.steps=4", "checkpoint.save_interval=2", "checkpoint.keep_last=0",
                        f"checkpoint.dir={run_dir}"), cwd=tmp_path).stdout
    assert f"{run_dir / 'latest'} points at {run_dir / 'step-4'}, which cannot be used ({shard} is damaged" in out
    assert f"resumed from {run_dir / 'step-2'} at step 2" in out
    assert (run_dir / "latest").read_text().strip() == "step-4"
    verify_checkpoint_files(run_dir / "step-4")  # written anew, intact
    assert not list(run_dir.glob(".step-*")), "the successful save removes incomplete folders"


def test_a_missing_train_state_file_and_a_config_that_contradicts_the_tensors_are_named(trained, tmp_path):
    run_dir = _copy_run(trained, tmp_path)
    step_dir = run_dir / "step-4"
    (step_dir / "train_state" / "rank-0.pt").unlink()
    write_manifest(step_dir)  # consistent folder, no checksum to blame: the missing file itself is named
    proc = run(train_cmd(1, "train.steps=5", f"checkpoint.dir={run_dir}"), cwd=tmp_path, check=False)
    _one_line_error(proc, "megarank train", f"{step_dir / 'train_state' / 'rank-0.pt'} is missing")

    cfg = step_dir / "config.yaml"
    cfg.write_text(cfg.read_text().replace("ffn_hidden_size: 128", "ffn_hidden_size: 192"))
    with pytest.raises(CheckpointError, match=rf"^{cfg} is damaged: its checksum does not match"):
        resolve_checkpoint(step_dir)
    write_manifest(step_dir)  # an edited config, re-checksummed: now the tensors contradict it
    proc = run(megarank_cmd(1, "evaluate", str(step_dir), "--data", str(SAMPLE), "--max-queries", "2"),
               cwd=tmp_path, check=False)
    _one_line_error(proc, "megarank evaluate", "linear_fc1.weight has shape", str(cfg), "does not match its tensors")


def test_a_non_existent_checkpoint_load_names_the_path(tmp_path):
    proc = run(train_cmd(1, "train.steps=1", f"checkpoint.load={tmp_path / 'nowhere'}"), cwd=tmp_path, check=False)
    line = _one_line_error(proc, "megarank train", str(tmp_path / "nowhere"), "does not exist")
    assert "config.yaml" not in line and "run" not in line.split("error:", 1)[1].replace(str(tmp_path), "")


NAN_SCRIPT = '''
import sys

if __name__ == "__main__":  # the torch_dist writer starts a spawn Manager: guard the main module
    import torch

    from megarank import checkpoint as ckpt
    from megarank.config import load_config, save_config
    from megarank.model import build_model
    from megarank.parallel.init import destroy_distributed, init_distributed

    out = sys.argv[2]
    cfg = load_config(sys.argv[1])
    init_distributed(1, 1)
    model = build_model(cfg.model, cfg.parallel)
    with torch.no_grad():
        model.decoder.layers[1].mlp.linear_fc2.weight[3, 5] = float("nan")
    ckpt.save_model_weights(model, out + "/model")
    save_config(cfg, out + "/config.yaml")
    ckpt.write_marker(out, kind="converted")
    ckpt.write_manifest(out)
    destroy_distributed()
'''


def test_nan_weights_with_a_valid_manifest_are_refused_naming_the_tensor(tmp_path):
    (tmp_path / "nan.py").write_text(NAN_SCRIPT)
    run([sys.executable, "nan.py", TINY, str(tmp_path / "nan")], cwd=tmp_path)
    verify_checkpoint_files(tmp_path / "nan")  # the files are as saved: only the values are bad
    proc = run(megarank_cmd(1, "evaluate", str(tmp_path / "nan"), "--data", str(SAMPLE), "--max-queries", "2"),
               cwd=tmp_path, check=False)
    _one_line_error(proc, "megarank evaluate", "tensor decoder.layers.1.mlp.linear_fc2.weight holds NaN")
    proc = run([sys.executable, "-m", "checkpoint_tools", "megatron-to-hf", str(tmp_path / "nan"), str(tmp_path / "hf")],
               cwd=tmp_path, check=False)
    _one_line_error(proc, "megarank-convert", "tensor decoder.layers.mlp.linear_fc2.weight holds NaN")
    assert not (tmp_path / "hf").exists(), "no export with NaN weights"
