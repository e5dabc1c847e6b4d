"""Held-out validation (data.valid_path, data.valid_fraction; megarank/training/validation.py) and a blend's training
loss per source: the split is a pure function of (seed, source), held-out groups are never drawn for training, the
per-group losses leave the trained loss bit for bit as it was and average to it, the config keys and their errors,
and two DP=2 runs of a blend: validation every step (with data.valid_path too) equals a direct computation with the
trained checkpoint, the per-source losses average (weighted by counts) to the logged loss, and the training is
bit-identical to the same run validated only at the end. The kill + resume of a blended DP=2 run with
data.valid_fraction and validation every other step is the ``blend_dp2`` layout of tests/test_resume.py."""
import json
import re
import subprocess
import sys
from functools import partial

import pytest
import torch

from megarank.config import ConfigError, config_help, load_config, validate
from megarank.data import GroupSampler, sample_data_dir
from megarank.data.holdout import TrainingPart, held_out_count, held_out_split
from megarank.training.data import make_group_source, make_valid_source
from megarank.training.loss import LOSS_NAMES, NEEDS_TEACHER, group_loss, per_group_losses, positive_ranks
from tests.training_harness import (TINY, assert_bit_identical, log_lines, read_plain_tensors, run_many, tb_scalars,
                                    train_cmd)

SAMPLE = sample_data_dir()
BLEND = (f"data.blend=[{{path: {SAMPLE / 'train_groups.jsonl'}, format: jsonl, weight: 3}}, "
         f"{{path: {SAMPLE}, format: beir, weight: 1}}]")
NAMES = ["train_groups.jsonl", "sample"]


def test_the_split_is_seeded_disjoint_and_the_same_in_another_process():
    held, training = held_out_split(100, 0.1, seed=7, source=1)
    assert len(held) == 10 and len(training) == 90 and sorted([*held, *training]) == list(range(100))
    assert list(training) == sorted(training) and list(held) != sorted(held)  # a seeded sample, kept in its order
    assert list(held_out_split(100, 0.1, 7, 1)[0]) == list(held)
    assert list(held_out_split(100, 0.1, 8, 1)[0]) != list(held) != list(held_out_split(100, 0.1, 7, 0)[0])
    # another process (another hash seed, as each torchrun rank and a resumed run are) holds out the same groups
    code = "from megarank.data.holdout import held_out_split; print(held_out_split(100, 0.1, 7, 1)[0].tolist())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": ""}).stdout
    assert json.loads(out) == [int(i) for i in held]
    assert [held_out_count(n, f) for n, f in ((12, 0.25), (6, 0.25), (10, 0.01), (2, 0.9), (1, 0.5), (9, 0))] == \
        [3, 2, 1, 1, 0, 0]


def test_held_out_groups_are_never_drawn_for_training():
    cfg = load_config(TINY, [BLEND, "data.valid_fraction=0.25", "train.seed=3"])
    blend = make_group_source(cfg)
    parts = blend.sources
    assert all(isinstance(p, TrainingPart) for p in parts) and blend.lengths == [9, 4]  # 12 - 3, 6 - 2
    assert [len(p.held_out) for p in parts] == [3, 2]
    drawn = [set(), set()]
    sampler = GroupSampler(len(blend), 4, 0, 1, seed=3)
    for _ in range(40):  # 12 blend epochs: every source goes round many times
        for index, epoch in next(sampler):
            source, group, source_epoch = blend.locate(index, epoch)
            whole = int(parts[source].training[group])
            drawn[source].add(whole)
            assert blend.get(index, epoch) == parts[source].source.get(whole, source_epoch)
    for part, seen in zip(parts, drawn):
        assert seen == set(part.training.tolist()) and not seen & set(part.held_out.tolist())
    # the held-out groups are the whole source's, in epoch 0
    assert parts[0].held_out_groups(2) == [parts[0].source.get(int(i), 0) for i in parts[0].held_out[:2]]


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_per_group_losses_average_to_the_loss_and_leave_the_trained_loss_bit_identical(name):
    from megarank.training.step import _loss_func

    gen = torch.Generator().manual_seed(0)
    relevance = torch.tensor([[2.0, 1.0, 0, 0, 0], [1.0, 0, 0, 0, 0], [1.0, 1.0, 0, 0, 0]])
    teacher = torch.randn(3, 5, generator=gen, dtype=torch.float64) if name in NEEDS_TEACHER else None
    loss_fn = partial(group_loss, name, teacher_temperature=2.0, distill_weight=0.7 if teacher is not None else 1.0)
    scores = torch.randn(15, 1, generator=gen, dtype=torch.float64)
    per_group = per_group_losses(loss_fn, scores, relevance, teacher)
    assert per_group.shape == (3,) and torch.allclose(per_group.mean(), loss_fn(scores, relevance, teacher), rtol=1e-12)
    ranks = positive_ranks(scores, relevance)
    assert ranks.shape == (3,) and ranks.min() >= 1
    grads = []
    for sources in (None, torch.tensor([0, 1, 0])):
        s = scores.float().clone().requires_grad_()
        loss, logged = _loss_func(loss_fn, relevance, teacher, 0.5, s, sources=sources)
        loss.backward()
        grads.append((loss.detach(), s.grad, logged["loss"]))
        assert ("group_losses" in logged) == (sources is not None)
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("overrides, message", [
    (["data.valid_fraction=1"], "data.valid_fraction must be in [0, 1) (got 1.0; 0 = no held-out groups)"),
    (["data.valid_fraction=-0.1"], "data.valid_fraction must be in [0, 1) (got -0.1; 0 = no held-out groups)"),
    (["data.valid_max_groups=0"], "data.valid_max_groups must be >= 1 (got 0)"),
    (["data.valid_split=dev"], "data.valid_split describes data.valid_path, which is not set"),
    ([BLEND, "data.valid_path=v.jsonl"],
     "data.valid_format is required with data.blend: the blend's sources name their own formats"),
    (["data.valid_path=dev", "data.valid_format=beir", "train.loss=kl", "data.format=jsonl", "data.train_path=t.jsonl"],
     "data.valid_path with format beir: train.loss=kl needs teacher scores of its queries in data.teacher_run (a "
     "single BEIR training source's); or validate on groups with pos_scores/neg_scores"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        validate(load_config(TINY, overrides))
    assert str(e.value) == f"invalid configuration:\n  - {message}"


def test_config_help_preflight_and_resume_know_the_keys(tmp_path, monkeypatch):
    from megarank.checkpoint.manager import training_changes
    from megarank.cli.preflight import check_train_config

    text = config_help()
    for key in ("valid_path", "valid_format", "valid_split", "valid_fraction", "valid_max_groups"):
        assert re.search(rf"^  {key}: ", text, re.M), key
    validate(load_config(TINY, [BLEND, "data.valid_path=v.jsonl", "data.valid_format=jsonl",
                                "data.valid_fraction=0.1"]))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        check_train_config(load_config(TINY, ["data.valid_path=none.jsonl", "data.valid_format=jsonl"]))
    assert str(e.value) == "data.valid_path none.jsonl does not exist (format jsonl expects a JSONL file)"
    # which groups are held out is what a run trains on; data.valid_path and the cap are not
    assert training_changes(load_config(TINY), load_config(TINY, ["data.valid_fraction=0.2"])) == \
        [("data.valid_fraction", 0.0, 0.2)]
    assert training_changes(load_config(TINY), load_config(TINY, ["data.valid_path=x", "data.valid_max_groups=3"])) \
        == []


VALID_LINE = re.compile(r"valid step (\d+) \| loss (\S+) \| acc (\S+) \| mrr (\S+) \| groups (\d+)(.*)")
SOURCE_LOSS = re.compile(r"groups train_groups\.jsonl (\d+), sample (\d+) \| loss by source (.*?) \| data wait")
COMMON = [BLEND, "data.valid_fraction=0.25", "train.steps=4", "train.log_interval=1", "checkpoint.save_interval=0",
          "parallel.use_distributed_optimizer=true"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two DP=2 runs of one blend with a quarter of each source held out: validated after every step, with
    data.valid_path too (5 more groups), and validated only at the end."""
    work = tmp_path_factory.mktemp("valid")
    (work / "valid.jsonl").write_text("".join((SAMPLE / "train_groups.jsonl").read_text().splitlines(True)[:5]))
    jobs = {
        "every": (2, train_cmd(2, *COMMON, "train.eval_interval=1", f"data.valid_path={work / 'valid.jsonl'}",
                               "data.valid_format=jsonl", f"checkpoint.dir={work / 'every'}")),
        "end": (2, train_cmd(2, *COMMON, f"checkpoint.dir={work / 'end'}")),
    }
    return work, run_many(jobs, cwd=work)


def _direct(run_dir, sets: dict) -> dict:
    """Loss (listwise), acc@1 and MRR of each set's groups scored by the Reranker on the run's last checkpoint."""
    from megarank import Reranker

    out = {}
    with Reranker.from_checkpoint(run_dir, dtype="fp32") as reranker:
        loss_fn = partial(group_loss, "listwise")
        for name, groups in sets.items():
            scores = reranker.score([(g.query, p) for g in groups for p in g.passages]).double()
            relevance = torch.tensor([g.labels for g in groups])
            ranks = positive_ranks(scores, relevance)
            out[name] = {"loss": per_group_losses(loss_fn, scores, relevance).mean().item(),
                         "acc": (ranks == 1).double().mean().item(), "mrr": (1 / ranks).double().mean().item(),
                         "groups": len(groups)}
    every = [g for groups in sets.values() for g in groups]
    n = len(every)
    out["all"] = {k: sum(out[s][k] * out[s]["groups"] for s in sets) / n for k in ("loss", "acc", "mrr")}
    return out


def test_validation_equals_a_direct_computation_with_the_trained_checkpoint(runs):
    work, outputs = runs
    lines = [m.groups() for m in VALID_LINE.finditer(outputs["every"])]
    assert [int(step) for step, *_ in lines] == [1, 2, 3, 4] and {int(m[4]) for m in lines} == {10}  # 3 + 2 + 5
    assert "validation groups: train_groups.jsonl 3, sample 2, valid.jsonl 5" in outputs["every"]
    cfg = load_config(TINY, [BLEND, "data.valid_fraction=0.25", f"data.valid_path={work / 'valid.jsonl'}",
                             "data.valid_format=jsonl"])
    parts, valid = make_group_source(cfg).sources, make_valid_source(cfg)
    assert len(valid) == 5
    sets = {"train_groups.jsonl": parts[0].held_out_groups(), "sample": parts[1].held_out_groups(),
            "valid.jsonl": [valid.get(i, 0) for i in range(5)]}
    want = _direct(work / "every", sets)
    tb = work / "every" / "tensorboard"
    for key in ("loss", "acc", "mrr"):
        assert tb_scalars(tb, f"valid/{key}")[4] == pytest.approx(want["all"][key], rel=1e-5, abs=1e-6), key
        for name in sets:
            got = tb_scalars(tb, f"valid/{name}/{key}")[4]
            assert got == pytest.approx(want[name][key], rel=1e-5, abs=1e-6), (name, key)
    assert float(lines[-1][1]) == pytest.approx(want["all"]["loss"], abs=6e-5)
    # the run validated only at the end reports the held-out sets alone, over the same checkpoint's groups
    end = [m.groups() for m in VALID_LINE.finditer(outputs["end"])]
    assert [(int(s), int(n)) for s, *_, n, _ in end] == [(4, 5)]


def test_per_source_losses_average_to_the_logged_loss(runs):
    work, outputs = runs
    out = outputs["every"]
    steps = log_lines(out)
    found = SOURCE_LOSS.findall(out)
    assert len(found) == 4 == len(steps)
    tb = work / "every" / "tensorboard"
    total = tb_scalars(tb, "train/loss")
    for step, (a, b, losses) in enumerate(found, start=1):
        counts = {"train_groups.jsonl": int(a), "sample": int(b)}
        logged = dict(item.rsplit(" ", 1) for item in losses.split(", "))
        assert set(logged) == {n for n, c in counts.items() if c}
        mean = sum(counts[n] * float(v) for n, v in logged.items()) / 4
        assert mean == pytest.approx(float(steps[step]["loss"]), abs=2e-4)
        exact = sum(counts[n] * tb_scalars(tb, f"train/{n}/loss")[step] for n in logged) / 4
        assert exact == pytest.approx(total[step], rel=1e-5)
        assert {n: tb_scalars(tb, f"train/groups/{n}")[step] for n in NAMES} == {n: float(c) for n, c in counts.items()}


def test_validation_during_training_leaves_the_training_bit_identical(runs):
    work, _ = runs
    for tag in ("train/loss", "train/grad_norm", "train/lr"):
        every, end = tb_scalars(work / "every" / "tensorboard", tag), tb_scalars(work / "end" / "tensorboard", tag)
        assert sorted(every) == [1, 2, 3, 4] and every == end, tag
    for part in ("model", "optimizer"):
        assert_bit_identical(read_plain_tensors(work / "every" / "step-4" / part),
                             read_plain_tensors(work / "end" / "step-4" / part), part)
