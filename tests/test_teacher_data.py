"""Teacher scores, graded labels and several positives on the way from the data files to a micro-batch."""
import json

import pytest
import torch

from megarank.config import GROUP_LOSSES, TEACHER_LOSSES, ConfigError, load_config
from megarank.data import (Batcher, BeirGroupSource, DataError, GroupsFileSource, PairTokenizer, build_tiny_tokenizer,
                           find_run_file, read_beir, read_jsonl_groups, read_run, read_scored_run, sample_data_dir)
from megarank.training.loss import LOSS_NAMES, NEEDS_TEACHER


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _group(i, n_pos=2, n_neg=6, scores=True, labels=False):
    g = {"query": f"q{i}", "pos_doc": [f"pos{i}_{k}" for k in range(n_pos)],
         "neg_doc": [f"neg{i}_{k}" for k in range(n_neg)]}
    if scores:
        g["pos_scores"] = [10.0 + k for k in range(n_pos)]
        g["neg_scores"] = [-float(k) for k in range(n_neg)]
    if labels:
        g["pos_labels"] = [2] + [1] * (n_pos - 1)
    return g


def test_config_loss_names_match_the_loss_module():
    import typing

    from megarank.config import TrainConfig

    assert set(LOSS_NAMES) == set(typing.get_args(typing.get_type_hints(TrainConfig)["loss"]))
    assert TEACHER_LOSSES == NEEDS_TEACHER and GROUP_LOSSES <= set(LOSS_NAMES)


def test_jsonl_teacher_scores_and_labels_travel_with_the_sampled_passages(tmp_path):
    path = _write(tmp_path / "g.jsonl", [_group(i, labels=True) for i in range(4)])
    groups, _ = read_jsonl_groups(path)
    assert groups[0]["pos_scores"] == [10.0, 11.0] and groups[0]["pos_labels"] == [2.0, 1.0]
    source = GroupsFileSource(groups, 3, seed=5, path_for_errors=path, with_teacher=True)
    for epoch in range(4):
        g = source.get(1, epoch)
        pos = g.passages[0]
        assert pos == f"pos1_{epoch % 2}" and g.labels[0] == (2.0 if epoch % 2 == 0 else 1.0)
        assert g.teacher[0] == 10.0 + epoch % 2 and g.labels[1:] == [0.0, 0.0, 0.0]
        for passage, score in zip(g.passages[1:], g.teacher[1:]):  # each negative keeps its own score
            assert score == -float(passage.split("_")[1])
    # the same sampling as without teacher scores (the positive and negatives do not depend on them)
    plain = GroupsFileSource(groups, 3, seed=5, path_for_errors=path)
    assert [plain.get(i, e).passages for i in range(4) for e in range(3)] == \
        [source.get(i, e).passages for i in range(4) for e in range(3)]
    assert plain.get(0, 0).teacher is None


def test_several_positives_per_group_rotate_and_fill_with_negatives(tmp_path):
    rows = [_group(0, n_pos=3, labels=True), _group(1, n_pos=1)]
    groups, _ = read_jsonl_groups(_write(tmp_path / "g.jsonl", rows))
    source = GroupsFileSource(groups, 4, seed=0, positives_per_group=2, with_teacher=True)
    assert source.group_size == 5
    seen = [source.get(0, e).passages[:2] for e in range(3)]
    assert seen == [["pos0_0", "pos0_1"], ["pos0_2", "pos0_0"], ["pos0_1", "pos0_2"]]
    assert source.get(0, 0).labels == [2.0, 1.0, 0.0, 0.0, 0.0]
    one = source.get(1, 0)  # one positive only: four negatives fill the group
    assert len(one.passages) == 5 and one.labels == [1.0, 0, 0, 0, 0] and len(one.teacher) == 5


@pytest.mark.parametrize("change, message", [
    ({"pos_scores": [1.0]}, r"line 1: 'pos_scores' has 1 entries but 'pos_doc' has 2"),
    ({"neg_scores": [0.0] * 5}, r"line 1: 'neg_scores' has 5 entries but 'neg_doc' has 6"),
    ({"neg_scores": [0.0, 1.0, float("nan"), 0.0, 0.0, 0.0]}, r"line 1: neg_scores\[2\] is nan, not a finite number"),
    ({"pos_scores": [1.0, float("inf")]}, r"line 1: pos_scores\[1\] is inf, not a finite number"),
    ({"pos_scores": [1.0, "2"]}, r"line 1: pos_scores\[1\] must be a number, got str"),
    ({"neg_scores": None}, r"line 1: has only one of 'pos_scores' and 'neg_scores'"),
    ({"pos_labels": [1, 0]}, r"line 1: pos_labels\[1\] is 0; a positive's label must be > 0"),
])
def test_bad_teacher_fields_name_the_line(tmp_path, change, message):
    row = {**_group(0), **change}
    with pytest.raises(DataError, match=message):
        read_jsonl_groups(_write(tmp_path / "g.jsonl", [json.dumps(row, allow_nan=True)]))


def test_a_teacher_loss_on_groups_without_scores_names_the_line(tmp_path):
    path = _write(tmp_path / "g.jsonl", [_group(0), _group(1, scores=False)])
    groups, _ = read_jsonl_groups(path)
    with pytest.raises(DataError, match=r"g\.jsonl line 2: has no 'pos_scores'/'neg_scores' but the loss needs"):
        GroupsFileSource(groups, 3, path_for_errors=path, with_teacher=True)
    with pytest.raises(DataError, match="filled in from other groups have no teacher score"):
        GroupsFileSource(groups[:1], 3, path_for_errors=path, with_teacher=True, fill_from_corpus=True)
    GroupsFileSource(groups, 3, path_for_errors=path)  # a loss without a teacher does not need them


def _teacher_run(tmp_path, beir, run, skip=None, top_k=10):
    lines = []
    for qid, docs in run.items():
        judged = [d for d, s in beir.qrels.get(qid, {}).items()]
        for rank, d in enumerate(dict.fromkeys(docs[:top_k] + judged), start=1):
            if (qid, d) != skip:
                lines.append(f"{qid} Q0 {d} {rank} {float(len(d) + rank) / 7!r} teacher")
    return _write(tmp_path / "teacher.trec", lines)


def test_beir_teacher_scores_and_graded_labels(tmp_path):
    beir = read_beir(sample_data_dir(), "train")
    run = read_run(find_run_file(sample_data_dir(), "train"))
    teacher = read_scored_run(_teacher_run(tmp_path, beir, run))
    source = BeirGroupSource(beir, run, n_negatives=4, top_k=10, seed=3, teacher=teacher, positives_per_group=2)
    plain = BeirGroupSource(beir, run, n_negatives=4, top_k=10, seed=3)
    for index, qid in enumerate(source.qids):
        for epoch in range(3):
            _, docids = source.get_ids(index, epoch)
            g = source.get(index, epoch)
            assert g.teacher == [teacher[qid][d] for d in docids]
            assert g.labels == [float(max(beir.qrels[qid].get(d, 0), 0)) for d in docids]
            n_pos = min(2, sum(s > 0 for s in beir.qrels[qid].values()))
            assert all(x > 0 for x in g.labels[:n_pos]) and not any(g.labels[n_pos:])
    q9 = source.qids.index("9")  # grades d33:2, d34:1, d39:1
    assert source.get_ids(q9, 0)[1][:2] == ["d33", "d34"] and source.get(q9, 0).labels[:2] == [2.0, 1.0]
    assert plain.get_ids(q9, 1)[1][0] == "d34"  # one positive per group rotates as before


def test_beir_teacher_run_missing_a_candidate_names_query_and_document(tmp_path):
    beir = read_beir(sample_data_dir(), "train")
    run = read_run(find_run_file(sample_data_dir(), "train"))
    qid = next(iter(run))
    victim = next(d for d in run[qid][:10] if beir.qrels[qid].get(d, 0) <= 0)
    teacher = read_scored_run(_teacher_run(tmp_path, beir, run, skip=(qid, victim)))
    with pytest.raises(DataError, match=rf"teacher\.trec: has no score for document '{victim}' of query '{qid}'"):
        BeirGroupSource(beir, run, n_negatives=4, top_k=10, teacher=teacher)


def test_scored_run_rejects_missing_and_non_finite_scores(tmp_path):
    with pytest.raises(DataError, match=r"line 2: has no score column"):
        read_scored_run(_write(tmp_path / "a.tsv", ["q\td\t1\t0.5", "q\te\t2"]))
    with pytest.raises(DataError, match=r"line 1: score inf of document 'd' for query 'q' is not finite"):
        read_scored_run(_write(tmp_path / "b.trec", ["q Q0 d 1 inf t"]))


def test_micro_batches_carry_relevance_and_teacher(tmp_path):
    tok = PairTokenizer(build_tiny_tokenizer(tmp_path / "tok"), max_length=64)
    groups, _ = read_jsonl_groups(_write(tmp_path / "g.jsonl", [_group(i, labels=True) for i in range(3)]))
    source = GroupsFileSource(groups, 2, seed=1, with_teacher=True)
    picked = [source.get(i, 0) for i in range(3)]
    for packed in (False, True):
        batches = Batcher(tok, packed=packed).micro_batches(picked, micro_batch_size=2)
        assert [len(b["relevance"]) for b in batches] == [2, 1]
        teacher = torch.cat([b["teacher"] for b in batches])
        assert teacher.tolist() == [g.teacher for g in picked] and teacher.dtype == torch.float32
        assert torch.cat([b["relevance"] for b in batches]).tolist() == [g.labels for g in picked]
    plain = Batcher(tok).micro_batches([(g.query, g.passages) for g in picked], micro_batch_size=3)[0]
    assert "teacher" not in plain and plain["relevance"][:, 0].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("overrides, message", [
    (["train.loss=kl"], r"train\.loss=kl needs teacher scores: set data\.teacher_run"),
    (["train.teacher_temperature=0"], r"train\.teacher_temperature must be > 0"),
    (["train.loss=kl", "data.teacher_run=t.trec", "train.distill_weight=1.5"], r"train\.distill_weight must be in \[0, 1\]"),
    (["train.distill_weight=0.5"], r"train\.distill_weight mixes a distillation loss .* train\.loss=listwise"),
    (["data.format=jsonl", "data.train_path=g.jsonl", "data.teacher_run=t.trec"], r"data\.teacher_run is for data\.format=beir"),
    (["data.positives_per_group=5"], r"data\.positives_per_group must be >= 1 and leave a negative"),
    (["train.loss=lambda", "data.n_passages=1"], r"data\.n_passages must be >= 2 for the lambda loss"),
])
def test_validate_names_the_key(overrides, message):
    from megarank.config import validate

    with pytest.raises(ConfigError, match=message):
        validate(load_config(None, overrides))


def test_scoring_does_not_need_the_training_batch_split():
    from megarank.config import validate

    cfg = load_config(None, ["train.global_batch_size=4", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match=r"train\.global_batch_size \(4\) must be divisible"):
        validate(cfg, world_size=2)
    validate(cfg, world_size=2, training=False)  # a model trained at one layout scores at any
