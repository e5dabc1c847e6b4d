"""Weights & Biases logging (logging.wandb_*) in W&B's offline mode: a real `megarank train` writes a W&B run whose
history holds what TensorBoard got, with the resolved config, named after the SLURM job; a resume continues the
same W&B run id. The run file is read back with W&B's own protobuf definitions (wandb.proto)."""
import glob
import json
import struct
from pathlib import Path

import pytest

from tests.training_harness import run, run_env, tb_scalars, train_cmd

pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb; part of the test extra)")


def wandb_records(path: Path):
    """The records of a ``run-ID.wandb`` file. Its container is LevelDB's log format, as W&B writes it
    (wandb/sdk/internal/datastore.py in wandb <= 0.18; Go core since): a 7-byte header ``:W&B`` + magic 0xBEE1 +
    version 0, then 32 KiB blocks of chunks (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last),
    each record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:7] == b":W&B\xe1\xbe\x00", data[:7]
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is zero padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def read_run(run_file: Path) -> dict:
    """{"id", "name", "group", "project", "config": {key: value}, "history": {step: {key: value}}}."""
    out = {"history": {}, "config": {}}
    for r in wandb_records(run_file):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(id=r.run.run_id, name=r.run.display_name, group=r.run.run_group, project=r.run.project)
            out["config"].update({c.key: json.loads(c.value_json) for c in r.run.config.update})
        elif kind == "history":
            row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            out["history"][int(row["_step"])] = row
    return out


def test_offline_wandb_run_holds_tensorboards_scalars_and_the_config_and_a_resume_continues_it(tmp_path):
    ckpt = tmp_path / "ckpt"
    common = ["train.log_interval=1", "train.lr_warmup_steps=0", "checkpoint.save_interval=2",
              f"checkpoint.dir={ckpt}", "logging.wandb_project=megarank-test", "logging.wandb_mode=offline"]
    env = run_env(SLURM_JOB_NAME="rr1b", SLURM_JOB_ID="4242")
    first = run(train_cmd(1, "train.steps=2", *common), cwd=tmp_path, env=env).stdout
    run(train_cmd(1, "train.steps=4", *common), cwd=tmp_path, env=env)  # resumes from step 2

    runs = sorted(glob.glob(str(ckpt / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(runs) == 2, (runs, first)
    one, two = (read_run(Path(p)) for p in runs)
    assert one["id"] == two["id"] and one["id"].startswith("megarank-"), "a resume continues the same W&B run"
    assert (one["name"], one["group"], one["project"]) == ("rr1b-4242", "rr1b", "megarank-test")
    assert one["config"]["train"]["loss"] == "listwise" and one["config"]["logging"]["wandb_mode"] == "offline"
    assert sorted(one["history"]) == [1, 2] and sorted(two["history"]) == [3, 4]
    history = {**one["history"], **two["history"]}
    for tag in ("train/loss", "train/lr", "train/grad_norm"):
        tb = tb_scalars(ckpt / "tensorboard", tag)
        assert sorted(tb) == [1, 2, 3, 4], tag
        for step, value in tb.items():  # TensorBoard stores float32; W&B the float64 it was given
            assert abs(history[step][tag] - value) <= 1e-6 * max(1.0, abs(value)), (tag, step)
