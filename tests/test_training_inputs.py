"""What a run trains on: too few groups for one global batch is one DataError naming the file and the key (raised
with the sampler, which the loop builds before the model); the sampler continues after a saved position that a
changed run no longer fits; and a resume with other data, allowed by train.allow_changed_data, trains on the new
data with one warning line (the refusals are in test_fault_table.py, the manager's rule in test_run_checkpoints.py)."""
import pytest

from megarank.config import load_config
from megarank.data import DataError, GroupSampler, sample_data_dir
from megarank.training.data import make_sampler
from tests.training_harness import TINY, log_lines, run, train_cmd

SAMPLE = sample_data_dir()


def test_too_few_groups_for_a_global_batch_names_the_file_and_the_key(tmp_path):
    groups = tmp_path / "g.jsonl"
    jsonl = load_config(TINY, ["data.format=jsonl", f"data.train_path={groups}"])
    with pytest.raises(DataError) as caught:
        make_sampler(jsonl, 2, 0, 1)
    assert str(caught.value) == (f"{groups}: 2 training groups cannot fill one global batch "
                                 "(train.global_batch_size=4); lower it or add groups")
    beir = load_config(TINY, ["train.global_batch_size=8"])
    with pytest.raises(DataError, match=rf"^{SAMPLE / 'qrels' / 'train.tsv'}: 6 training groups \(queries with a "
                                        r"judged-relevant document and candidates\) cannot fill one global batch "
                                        r"\(train.global_batch_size=8\)"):
        make_sampler(beir, 6, 0, 1)
    assert make_sampler(beir, 8, 0, 2).steps_per_epoch == 1


def test_a_saved_position_past_a_now_shorter_epoch_starts_the_next_epoch():
    saved = {"epoch": 2, "step_in_epoch": 3, "seed": 0}
    longer = GroupSampler(12, 4, 0, 1)  # 3 steps per epoch: the saved epoch is over, next() starts epoch 3
    longer.load_state_dict(saved)
    assert {e for _, e in next(longer)} == {3}
    shorter = GroupSampler(8, 4, 0, 1)  # 2 steps per epoch (fewer groups, or a larger global batch)
    shorter.load_state_dict(saved)
    assert shorter.state_dict() == {"epoch": 3, "step_in_epoch": 0, "seed": 0}
    assert next(shorter) == [(i, 3) for i in shorter.global_batch_at(3, 0)]
    with pytest.raises(DataError, match="seed 1 but this run uses seed 0"):
        shorter.load_state_dict({**saved, "seed": 1})


def test_allow_changed_data_resumes_on_the_new_data_with_one_warning(tmp_path):
    run_dir = tmp_path / "run"
    run(train_cmd(1, "train.steps=2", f"checkpoint.dir={run_dir}"), cwd=tmp_path)
    groups = SAMPLE / "train_groups.jsonl"
    out = run(train_cmd(1, "train.steps=4", "train.log_interval=1", f"checkpoint.dir={run_dir}", "data.format=jsonl",
                        f"data.train_path={groups}", "train.allow_changed_data=true"), cwd=tmp_path).stdout
    warnings = [ln for ln in out.splitlines() if "train.allow_changed_data=true" in ln]
    assert len(warnings) == 1 and "WARNING" in warnings[0], out[-3000:]
    assert f"data.format beir -> jsonl, data.train_path null -> {groups}" in warnings[0]
    assert f"resumed from {run_dir / 'step-2'} at step 2" in out
    assert sorted(log_lines(out)) == [3, 4]
    saved = load_config(str(run_dir / "step-4" / "config.yaml"))
    assert (saved.data.format, saved.data.train_path) == ("jsonl", str(groups))  # the next resume compares to this
