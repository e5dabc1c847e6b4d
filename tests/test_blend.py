"""data.blend (megarank/data/blend.py): megatron-core's blending table, shares, determinism, each source's own
epochs, config errors, and a tiny training run from a blend of a JSONL file and a Parquet file. The SIGKILL +
resume of a blended DP=2 run is the ``blend_dp2`` layout of tests/test_resume.py; the README's blend of two real
collections is run here as written."""
import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megarank.cli.preflight import check_train_config
from megarank.config import ConfigError, load_config, validate
from megarank.data import GroupSampler, GroupsFileSource, sample_data_dir
from megarank.data.blend import BlendedGroupSource, blending_indices
from megarank.training.data import make_group_source
from tests.training_harness import REPO, SHARED_DATA, TINY, log_lines, run, run_env, tb_scalars, train_cmd


def _source(tag: str, n: int, seed: int = 5) -> GroupsFileSource:
    groups = [{"query": f"{tag}{i}", "pos": [f"{tag}{i}+{k}" for k in range(3)],
               "neg": [f"{tag}{i}-{k}" for k in range(6)], "line": i + 1} for i in range(n)]
    return GroupsFileSource(groups, n_negatives=3, seed=seed, path_for_errors=f"{tag}.jsonl")


def _blend(sizes=(7, 50, 23), weights=(5, 3, 2), seed=5, **kw) -> BlendedGroupSource:
    tags = "abc"[:len(sizes)]
    return BlendedGroupSource([_source(t, n, seed) for t, n in zip(tags, sizes)], list(weights), list(tags), seed, **kw)


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1.0, 7.0], [0.01, 0.98, 0.01]])
def test_the_table_is_megatron_cores_build_blending_indices(weights):
    from megatron.core.datasets import helpers

    size = 5000
    want_index, want_sample = np.zeros(size, dtype=np.int16), np.zeros(size, dtype=np.int64)
    helpers.build_blending_indices(want_index, want_sample, np.asarray(weights, dtype=np.float64), len(weights),
                                   size, False)
    index, sample = blending_indices(weights, size)
    assert np.array_equal(index, want_index) and np.array_equal(sample, want_sample)


def test_each_sources_share_of_10000_sampled_draws_is_within_2_percent_of_its_weight():
    blend = _blend()
    sampler = GroupSampler(len(blend), 8, 0, 1, seed=5)
    drawn = collections.Counter()
    for _ in range(10000 // 8):
        drawn.update(blend.names[blend.source_of(i)] for i, _ in next(sampler))
    assert sum(drawn.values()) == 10000
    for name, weight in zip(blend.names, blend.weights):
        assert abs(drawn[name] / 10000 - weight) <= 0.02, (name, drawn[name], weight)
    assert [round(w, 3) for w in blend.weights] == [0.5, 0.3, 0.2]


def test_same_seed_same_groups_in_any_order_and_dp_ranks_rebuild_the_whole_batch():
    one, other = _blend(), _blend()
    keys = [(i, e) for e in range(4) for i in range(len(one))]
    want = [one.get(i, e) for i, e in keys]
    assert [other.get(i, e) for i, e in reversed(keys)] == want[::-1]  # no state carried between calls
    assert [_blend(seed=6).get(i, e) for i, e in keys] != want
    full = GroupSampler(len(one), 8, 0, 1, seed=5)
    ranks = [GroupSampler(len(one), 8, r, 2, seed=5) for r in range(2)]
    for _ in range(25):  # past the end of the first blend epoch (10 steps)
        whole = [one.get(i, e) for i, e in next(full)]
        assert [_blend().get(i, e) for r in ranks for i, e in next(r)] == whole


def _draws_by_source_epoch(blend, source: int, blend_epochs: int) -> dict[int, list[int]]:
    """{source epoch: the source's group indices drawn there} over whole blend epochs."""
    found = collections.defaultdict(list)
    for e in range(blend_epochs):
        for i in range(len(blend)):
            s, group, source_epoch = blend.locate(i, e)
            if s == source:
                found[source_epoch].append(group)
    return found


def test_each_source_exhausts_then_reshuffles_on_its_own_epoch():
    blend = _blend()  # per blend epoch of 80: a (7 groups) 40 draws, b (50) 24, c (23) 16
    assert list(blend.counts) == [40, 24, 16]
    small, large = _draws_by_source_epoch(blend, 0, 7), _draws_by_source_epoch(blend, 1, 7)
    assert len(small) == 40 and len(large) == 4  # 280 / 7 and 168 / 50 (the last one begun)
    for epochs in (small, large):
        whole = [g for e, g in sorted(epochs.items())][:-1]
        assert all(sorted(groups) == list(range(len(groups))) for groups in whole)  # every group once per epoch
    orders = {tuple(blend.source_epoch_order(0, e)) for e in range(40)}
    assert len(orders) > 30  # a fresh order per source epoch
    # a source's orders are its own: the same with other weights and sources beside it
    assert _blend(sizes=(7, 3), weights=(1, 9)).source_epoch_order(0, 4) == blend.source_epoch_order(0, 4)
    # the group is its source's group in the source's epoch (negatives redrawn, positives rotated per source epoch)
    i = next(i for i in range(len(blend)) if blend.source_of(i) == 0)
    s, group, source_epoch = blend.locate(i, 3)
    assert blend.get(i, 3) == blend.sources[0].get(group, source_epoch) and source_epoch == 17


def test_query_prefix_and_per_source_counts():
    blend = _blend(sizes=(4, 6), weights=(1, 1), query_prefixes=["find: ", ""])
    assert {blend.get(i, 0).query[:6] for i in range(10) if blend.source_of(i) == 0} == {"find: "}
    assert all(not blend.get(i, 0).query.startswith("find") for i in range(10) if blend.source_of(i) == 1)
    assert blend.source_counts(range(10)) == {"a": 5, "b": 5}
    assert "a: 4 groups, weight 0.5, 5 per blend epoch of 10 (1.25 of its epochs)" in blend.describe()


BLEND_OF_TWO = "data.blend=[{path: a.jsonl, format: jsonl, weight: 3}, {path: b.parquet, format: parquet, weight: 1}]"


@pytest.mark.parametrize("overrides, message", [
    ([BLEND_OF_TWO, "data.train_path=x.jsonl"],
     "data.train_path names the single training source; with data.blend each entry names its own (path)"),
    ([BLEND_OF_TWO, "data.format=jsonl"],
     "data.format=jsonl is the single training source's; with data.blend each entry names its own (format)"),
    (["data.blend=[{path: a.jsonl, format: jsonl, weight: 0}]"], "data.blend[0].weight must be > 0 (got 0.0)"),
    (["data.blend=[{path: a.jsonl, weight: 1}]"], "data.blend[0].format is required (one of jsonl, beir, "
                                                  "nemo_corpus, parquet, hf_disk, triples)"),
    (["data.blend=[{format: jsonl, weight: 1}]"], "data.blend[0].path is required: the source's groups file or folder"),
    (["data.blend=[{path: a.jsonl, format: jsonl, weight: 1}, {path: b, format: beir, weight: 1, n_passages: 8}]"],
     "data.blend[1].n_passages=8 disagrees with data.n_passages=5: every source of a blend gives groups of one "
     "size (a micro-batch holds whole groups); set it to 5 or leave it out"),
    (["data.blend=[{path: a.jsonl, format: jsonl, weight: 1, run: r.tsv}]"],
     "data.blend[0].run is the first-stage run of a BEIR source; format jsonl holds its negatives"),
    (["data.blend=[{path: b, format: beir, weight: 1}]", "train.loss=kl"],
     "data.blend[0]: train.loss=kl needs teacher scores, which a format beir source of a blend does not carry; "
     "use groups with pos_scores/neg_scores (megarank mine --teacher writes them)"),
])
def test_config_errors_are_one_line_naming_the_entry_and_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        validate(load_config(TINY, overrides))
    assert str(e.value) == f"invalid configuration:\n  - {message}"


def test_a_wrong_format_and_a_missing_path_name_the_entry(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.blend\[0\]\.format: 'csv' is not one of"):
        load_config(TINY, ["data.blend=[{path: a.csv, format: csv, weight: 1}]"])
    (tmp_path / "a.jsonl").write_text("")
    cfg = load_config(TINY, [f"data.blend=[{{path: {tmp_path / 'a.jsonl'}, format: jsonl, weight: 1}}, "
                             f"{{path: {tmp_path / 'none'}, format: hf_disk, weight: 1}}]"])
    with pytest.raises(ConfigError) as e:
        check_train_config(cfg)
    assert str(e.value) == (f"data.blend[1].path {tmp_path / 'none'} does not exist (format hf_disk expects a "
                            "datasets save_to_disk folder)")


def test_a_resume_compares_each_entry_and_switching_to_or_from_a_blend(tmp_path, monkeypatch):
    from megarank.checkpoint.manager import saved_config, training_changes

    monkeypatch.chdir(tmp_path)
    single, blend = load_config(TINY), load_config(TINY, [BLEND_OF_TWO])
    saved = saved_config(blend)
    assert [e.path for e in saved.data.blend] == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")]
    assert training_changes(saved, blend) == []
    assert training_changes(single, blend) == [("data.blend", 0, 2)]
    assert training_changes(blend, single) == [("data.blend", 2, 0)]
    reweighted = load_config(TINY, [BLEND_OF_TWO.replace("weight: 1}", "weight: 2, query_prefix: 'q: '}")])
    assert training_changes(saved, reweighted) == [("data.blend[1].weight", 1.0, 2.0),
                                                   ("data.blend[1].query_prefix", "", "q: ")]


@pytest.fixture
def two_formats(tmp_path):
    """The sample's JSONL groups, and the same groups as Parquet with other column names (documents as the JSONL
    reader writes them: "title text")."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = (sample_data_dir() / "train_groups.jsonl").read_text().splitlines()
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    rows = [json.loads(line) for line in lines]
    texts = lambda docs: [d if isinstance(d, str) else f"{d['title']} {d['text']}".strip() for d in docs]  # noqa: E731
    pq.write_table(pa.table({"question": [r["query"] for r in rows], "positive": [texts(r["pos_doc"]) for r in rows],
                             "negative": [texts(r["neg_doc"]) for r in rows]}), tmp_path / "b.parquet")
    return tmp_path


def test_a_blend_of_a_jsonl_file_and_a_parquet_file_reads_each_source(two_formats, monkeypatch):
    monkeypatch.chdir(two_formats)
    blend = make_group_source(load_config(TINY, [BLEND_OF_TWO.replace(
        "format: parquet,", "format: parquet, columns: {query: question, pos_doc: positive, neg_doc: negative},")]))
    assert blend.names == ["a.jsonl", "b.parquet"] and blend.lengths == [12, 12] and list(blend.counts) == [18, 6]
    jsonl, parquet = blend.sources
    assert [jsonl.get(i, 2) for i in range(12)] == [parquet.get(i, 2) for i in range(12)]  # same groups, same seed


def test_a_tiny_run_trains_from_a_blend_of_two_formats_and_logs_per_source_counts(two_formats):
    blend = BLEND_OF_TWO.replace("format: parquet,",
                                 "format: parquet, columns: {query: question, pos_doc: positive, neg_doc: negative},")
    out = run(train_cmd(1, blend, "train.steps=3", "train.log_interval=1", "logging.tensorboard_dir=tb"),
              cwd=two_formats).stdout
    assert re.search(r"blend: a\.jsonl: 12 groups, weight 0\.75, 18 per blend epoch of 24 \(1\.5 of its epochs\); "
                     r"b\.parquet: 12 groups, weight 0\.25, 6 per blend epoch of 24 \(0\.5 of its epochs\)", out), out
    lines = log_lines(out)
    assert sorted(lines) == [1, 2, 3] and all(np.isfinite(float(v["loss"])) for v in lines.values())
    counts = re.findall(r"ETA \S+ \| groups a\.jsonl (\d), b\.parquet (\d)", out)
    assert len(counts) == 3 and all(int(a) + int(b) == 4 for a, b in counts)
    tb = {name: tb_scalars(two_formats / "tb", f"train/groups/{name}") for name in ("a.jsonl", "b.parquet")}
    assert [tb["a.jsonl"][s] for s in (1, 2, 3)] == [float(a) for a, _ in counts]
    assert [tb["b.parquet"][s] for s in (1, 2, 3)] == [float(b) for _, b in counts]
    # each source's mean loss in the step (sources without a group left out); weighted by the counts, the step's loss
    for step, (a, b) in enumerate(counts, start=1):
        losses = {name: tb_scalars(two_formats / "tb", f"train/{name}/loss").get(step) for name in tb}
        assert {n for n, v in losses.items() if v is not None} == {n for n, c in zip(tb, (a, b)) if int(c)}
        mean = sum(int(c) * (losses[n] or 0.0) for n, c in zip(tb, (a, b))) / 4
        assert mean == pytest.approx(tb_scalars(two_formats / "tb", "train/loss")[step], rel=1e-5)
    assert len(re.findall(r"\| loss by source a\.jsonl \d\.\d{4}", out)) == sum(int(a) > 0 for a, _ in counts)


def _readme_block(title: str) -> list[str]:
    """The commands of the README's first bash block under ``## <title>``, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index(f"## {title}"):], re.S).group(1)
    return [line.strip() for line in block.replace("\\\n", " ").splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.skipif(not (SHARED_DATA / "scifact-train" / "corpus.jsonl").is_file()
                    or not (SHARED_DATA / "cranfield" / "corpus.jsonl").is_file(),
                    reason=f"the real collections are not at {SHARED_DATA} (the README's blend reads them)")
def test_readme_blend_of_two_real_collections_runs_as_written(tmp_path):
    commands = _readme_block("Train from a blend of collections")
    assert [c.split()[:2] for c in commands] == [["megarank", "train"]]
    repo = tmp_path / "repo"  # the block's repo-relative paths and ../shared/data, without writing into the repo
    repo.mkdir()
    for name in ("configs", "megarank"):
        (repo / name).symlink_to(REPO / name)
    (tmp_path / "shared").symlink_to(SHARED_DATA.parent)
    env = run_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", "-c", commands[0]], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{commands[0]}\n{out[-3000:]}"
    assert re.search(r"blend: scifact-train: 809 groups, weight 0\.75, \d+ per blend epoch .*; cranfield: "
                     r"\d+ groups, weight 0\.25", out), out[-3000:]
    steps = re.findall(r"ETA \S+ \| groups scifact-train (\d+), cranfield (\d+)", out)
    assert steps and all(int(a) + int(b) == 4 for a, b in steps)
    assert (repo / "runs" / "blend" / "latest").is_file()
