"""Fault-injection table: bad inputs a user or an operator meets, each given to a real `megarank` process.

Every case asserts (1) a non-zero exit code, (2) a one-line error on stderr, ``megarank <command>: error: ...``,
that names the culprit (file and line, config key, flag) and no traceback anywhere in the output, and (3) that
nothing that existed before was damaged: a trained run (its `latest` and step folder), an earlier --out run file
and metrics file, the data, are byte-identical afterwards and no step folder or output was added.

Most cases fail in the checks that run before torch / megatron-core are imported (a fraction of a second);
those about file contents need the data to be read and take one import of the training stack each (every
reader's own faults are unit-tested in test_data.py; here each kind of file is met once through the CLI).
Cases about the data's contents train into a run folder of their own (`fresh`): resuming the trained run with
other data is itself refused, first (the `resume-*` cases).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from megarank.data import sample_data_dir
from tests.training_harness import TINY, run, run_env, train_cmd

SAMPLE = sample_data_dir()
PREVIOUS_RUN = "1 Q0 d01 1 0.5 earlier\n"
PREVIOUS_METRICS = '{"earlier": true}\n'


@dataclass
class Ctx:
    """What the cases point at: a trained run, earlier outputs, data folders with one fault injected each."""

    work: Path
    run_dir: Path  # a trained run (latest -> step-1), used as checkpoint.dir and as the evaluate checkpoint
    prev_trec: Path
    prev_json: Path
    blocker: Path  # a regular file: "folders" below it cannot be created
    unwritable: Path  # a folder nobody may write into (read-only for a user; /sys for root)
    bad: dict[str, Path] = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    pristine: dict[str, str] = field(default_factory=dict)  # snapshot of `work` when the fixture was built
    pristine_run: Path | None = None  # a copy of run_dir outside `work`


def _unwritable_dir(work: Path) -> Path | None:
    """A folder that refuses new files: chmod 555 where that binds (not root), else /sys (refused even to root)."""
    ro = work / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    for candidate in (ro, Path("/sys")):
        try:
            fd, name = tempfile.mkstemp(dir=candidate)
        except OSError:
            return candidate
        os.close(fd)
        os.unlink(name)
    return None


def _copy_sample(work: Path, name: str) -> Path:
    folder = work / name
    shutil.copytree(SAMPLE, folder)
    return folder


def _replace_line(path: Path, number: int, edit: Callable[[bytes], bytes]) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[number - 1] = edit(lines[number - 1])
    path.write_bytes(b"\n".join(lines))


def _latin1(line: bytes) -> bytes:
    """A latin-1 e-acute as the line's second byte: what an ISO-8859-1 export leaves in a file."""
    return line[:1] + b"\xe9" + line[1:]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> Ctx:
    work = tmp_path_factory.mktemp("faults")
    env = run_env(MEGARANK_CACHE=str(tmp_path_factory.mktemp("cache")))
    run(train_cmd(1, "train.steps=1", f"checkpoint.dir={work / 'run'}"), cwd=work, env=env)
    assert (work / "run" / "latest").read_text().strip() == "step-1"
    # A pristine copy outside `work`: a case that wrongly succeeds (and trains on) is restored from it, so
    # that one regression fails one case, not every case after it.
    pristine_run = tmp_path_factory.mktemp("pristine") / "run"
    shutil.copytree(work / "run", pristine_run)
    unwritable = _unwritable_dir(work)
    if unwritable is None:
        pytest.skip("no folder here refuses writes (root on a machine without a read-only /sys)")
    c = Ctx(work=work, run_dir=work / "run", prev_trec=work / "prev.trec", prev_json=work / "prev.json",
            blocker=work / "blocker", unwritable=unwritable, env=env, pristine_run=pristine_run)
    c.prev_trec.write_text(PREVIOUS_RUN)
    c.prev_json.write_text(PREVIOUS_METRICS)
    c.blocker.write_text("a file, not a folder\n")
    (work / "bad-utf8.yaml").write_bytes(Path(TINY).read_bytes().replace(b"Tiny CPU config", b"Tiny CPU \xff config"))
    (work / "bad-syntax.yaml").write_text("model:\n  num_layers: [2\ntrain:\n  steps: 1\n")
    for name, file, line in (("corpus", "corpus.jsonl", 7), ("queries", "queries.jsonl", 2),
                             ("run", "candidates/train.run.tsv", 5),
                             ("test-corpus", "corpus.jsonl", 3)):
        c.bad[name] = _copy_sample(work, f"bad-{name}")
        _replace_line(c.bad[name] / file, line, _latin1)
    c.bad["unknown-doc"] = _copy_sample(work, "bad-unknown-doc")
    _replace_line(c.bad["unknown-doc"] / "candidates" / "train.run.tsv", 3, lambda b: b.replace(b"d", b"zz", 1))
    c.bad["two-groups"] = work / "g.jsonl"  # fewer groups than one global batch (train.global_batch_size=4)
    lines = (SAMPLE / "train_groups.jsonl").read_text().splitlines()
    c.bad["two-groups"].write_text("\n".join(lines[:2]) + "\n")
    c.bad["groups"] = work / "groups.jsonl"
    shutil.copy(SAMPLE / "train_groups.jsonl", c.bad["groups"])
    _replace_line(c.bad["groups"], 2, _latin1)
    c.bad["triples"] = work / "triples.tsv"  # MS MARCO triples with a line of two columns
    c.bad["triples"].write_text("q\tp\tn\nq\tp\n")
    eval_run = (SAMPLE / "candidates" / "test.run.tsv").read_text().splitlines()
    eval_run[4] = eval_run[4].replace("\td", "\tmissing-d", 1)
    (work / "eval-unknown-doc.tsv").write_text("\n".join(eval_run) + "\n")
    _damaged_checkpoints(c)
    c.pristine = _snapshot(work)
    return c


def _damaged_checkpoints(c: Ctx) -> None:
    """Copies of the trained run, each damaged one way (what a crash, a bad disk or a hand edit leaves)."""
    def copy(name: str) -> Path:
        shutil.copytree(c.run_dir, c.work / name, ignore=shutil.ignore_patterns("*lock*"))
        c.bad[name] = c.work / name
        return c.work / name / "step-1"

    copy("ck-latest-garbage")
    (c.bad["ck-latest-garbage"] / "latest").write_bytes(b"step-9x\x00\n")
    shutil.rmtree(copy("ck-no-train-state") / "train_state")
    config = copy("ck-config-edited") / "config.yaml"
    config.write_text(config.read_text().replace("hidden_size: 64", "hidden_size: 96", 1))
    shard = copy("ck-shard-damaged") / "model" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(range(64))  # 64 bytes of garbage in the middle of the file
    shard.write_bytes(bytes(data))


def _restore(c: Ctx) -> None:
    """Undo what an earlier (failed) case left: the run folder back from its pristine copy, earlier outputs."""
    if _snapshot(c.work) == c.pristine:
        return
    shutil.rmtree(c.run_dir)
    shutil.copytree(c.pristine_run, c.run_dir)
    c.prev_trec.write_text(PREVIOUS_RUN)
    c.prev_json.write_text(PREVIOUS_METRICS)


def _snapshot(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root; a run's lock file is left out (it holds whoever ran
    last, which is not an output), and so is a groups file's index (``<file>.megarank-index``: a cache beside the
    data, written whole through a temp file and a rename, that records a bad line's error so that every rank fails
    with the same sentence; docs/data.md "Large groups files: the index")."""
    out = {}
    for path in sorted(root.rglob("*")):
        if (path.is_file() and not path.is_symlink() and "lock" not in path.name
                and ".megarank-index" not in path.name):
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@dataclass
class Case:
    id: str
    argv: Callable[[Ctx], list]  # after `python -m megarank`
    names: list[str]  # substrings the error line must contain
    not_names: list[str] = field(default_factory=list)  # ... and must not (a culprit wrongly blamed)
    also: list[str] = field(default_factory=list)  # elsewhere in stderr (a step's own error, for quickstart)
    code: int = 2


def train(*overrides, config=TINY):
    return lambda c: ["train", config, f"checkpoint.dir={c.run_dir}", "train.steps=2", *[
        o(c) if callable(o) else o for o in overrides]]


def fresh(name, *overrides, config=TINY):
    """`train` into a run folder of its own (outside `work`, one per case: a case that wrongly trains cannot make
    the next one resume)."""
    return lambda c: ["train", config, f"checkpoint.dir={c.work.parent / f'{c.work.name}-fresh-{name}'}",
                      "train.steps=2", *[o(c) if callable(o) else o for o in overrides]]


def evaluate(*extra, command="evaluate", out=True, checkpoint=None):
    """`evaluate RUN --data SAMPLE --split test --out prev.trec --metrics-out prev.json EXTRA` (later flags win)."""
    def argv(c):
        outputs = ["--out", str(c.prev_trec), "--metrics-out", str(c.prev_json)] if out else []
        args = [a(c) if callable(a) else a for a in extra]
        data = [] if "--data" in args else ["--data", str(SAMPLE)]
        return [command, checkpoint(c) if checkpoint else c.run_dir, *data, "--split", "test", *outputs, *args]
    return argv


def bad(name, sub=""):
    return lambda c: str(c.bad[name] / sub) if sub else str(c.bad[name])


CASES = [
    # --- the config file and its overrides (fail in load_config)
    Case("config-missing", lambda c: ["train", str(c.work / "nope.yaml")], ["config file", "nope.yaml", "does not exist"]),
    Case("config-not-utf8", lambda c: ["train", str(c.work / "bad-utf8.yaml")], ["bad-utf8.yaml line 1", "UTF-8", "0xff"]),
    Case("config-bad-yaml", lambda c: ["train", str(c.work / "bad-syntax.yaml")], ["bad-syntax.yaml line 3", "invalid YAML"]),
    Case("override-bad-number", train("train.lr=abc"), ["command-line override train.lr=abc", "expected a number"],
         not_names=["tiny.yaml"]),
    Case("override-unknown-key", train("train.lrr=1e-5"), ["command-line override train.lrr=1e-5", "unknown key train.lrr",
                                                             "lr_warmup_steps"], not_names=["tiny.yaml"]),
    Case("override-no-value", train("train.lr"), ["command-line override 'train.lr'", "section.key=value"]),
    Case("override-bad-choice", train("data.format=xml"), ["data.format=xml", "'jsonl', 'beir'"], not_names=["tiny.yaml"]),
    Case("steps-zero", train("train.steps=0"), ["train.steps must be positive"]),
    # --- paths a training config names (fail in the preflight checks)
    Case("train-path-missing", train(lambda c: f"data.train_path={c.work / 'no-such-beir'}"),
         ["data.train_path", "no-such-beir", "does not exist"], not_names=["run file", "candidates"]),
    Case("train-jsonl-missing", train("data.format=jsonl", lambda c: f"data.train_path={c.work / 'no.jsonl'}"),
         ["data.train_path", "no.jsonl", "does not exist"]),
    Case("train-parquet-missing", train("data.format=parquet", lambda c: f"data.train_path={c.work / 'no.parquet'}"),
         ["data.train_path", "no.parquet", "does not exist", "data.format=parquet expects a Parquet file or a folder"]),
    Case("train-path-not-beir", train(lambda c: f"data.train_path={c.run_dir}"), ["data.train_path", "not a BEIR folder"]),
    Case("eval-path-missing", train(lambda c: f"data.eval_path={c.work / 'no-eval'}"), ["data.eval_path", "no-eval"]),
    Case("eval-split-missing", train(f"data.eval_path={SAMPLE}", "data.eval_split=dev"),
         ["data.eval_path", "qrels/dev.tsv", "splits there: test, train"]),
    Case("train-run-missing", train(lambda c: f"data.train_run={c.work / 'no-run.tsv'}"), ["data.train_run", "no-run.tsv"]),
    Case("checkpoint-load-missing", train(lambda c: f"checkpoint.load={c.work / 'no-ckpt'}"),
         ["checkpoint.load", "no-ckpt", "does not exist"], not_names=["config.yaml"]),
    Case("checkpoint-dir-under-a-file", lambda c: ["train", TINY, f"checkpoint.dir={c.blocker / 'run'}"],
         ["checkpoint.dir", "blocker", "is a file"]),
    Case("checkpoint-dir-unwritable", lambda c: ["train", TINY, f"checkpoint.dir={c.unwritable / 'run'}"],
         ["checkpoint.dir", "not writable"]),
    Case("tensorboard-dir-under-a-file", train(lambda c: f"logging.tensorboard_dir={c.blocker / 'tb'}"),
         ["logging.tensorboard_dir", "blocker"]),
    # --- file contents (fail while the training data is read, before any step)
    Case("corpus-not-utf8", fresh("corpus", lambda c: f"data.train_path={c.bad['corpus']}"),
         ["bad-corpus/corpus.jsonl line 7", "not valid UTF-8", "0xe9"]),
    Case("queries-not-utf8", fresh("queries", lambda c: f"data.train_path={c.bad['queries']}"),
         ["bad-queries/queries.jsonl line 2", "not valid UTF-8"]),
    Case("run-not-utf8", fresh("run", lambda c: f"data.train_path={c.bad['run']}"),
         ["bad-run/candidates/train.run.tsv line 5", "not valid UTF-8"]),
    Case("groups-not-utf8", fresh("groups", "data.format=jsonl", lambda c: f"data.train_path={c.bad['groups']}"),
         ["groups.jsonl line 2", "not valid UTF-8"]),
    Case("triples-short-line", fresh("triples", "data.format=triples", lambda c: f"data.train_path={c.bad['triples']}"),
         ["triples.tsv line 2", "expected 3 tab-separated columns (query, positive, negative), got 2"]),
    Case("run-unknown-doc", fresh("unknown-doc", lambda c: f"data.train_path={c.bad['unknown-doc']}"),
         ["bad-unknown-doc/candidates/train.run.tsv line 3", "candidate document 'zz", "not in the corpus"]),
    Case("max-length-below-template", fresh("max-length", "data.max_length=16"),
         ["data.max_length=16", "data.template", "23 tokens"]),
    Case("negatives-top-k-too-small", fresh("top-k", "data.negatives_top_k=3"),
         ["train.run.tsv", "hard negatives in its top 3", "set data.negatives_top_k="]),
    # --- too few training groups for one global batch (fail after reading the data, before the model is built)
    Case("groups-fewer-than-a-global-batch", fresh("two-groups", "data.format=jsonl",
                                                   lambda c: f"data.train_path={c.bad['two-groups']}"),
         ["g.jsonl: 2 training groups cannot fill one global batch (train.global_batch_size=4)", "lower it or add groups"]),
    Case("sample-fewer-than-a-global-batch", fresh("gb8", "train.global_batch_size=8"),
         ["qrels/train.tsv: 6 training groups", "cannot fill one global batch (train.global_batch_size=8)"]),
    # --- a resume with other training data or settings (fails before the data is read or the model is built)
    Case("resume-changed-data", train("data.format=jsonl", f"data.train_path={SAMPLE / 'train_groups.jsonl'}"),
         ["run/step-1 was trained on other data or settings than this run's config", "data.format beir -> jsonl",
          f"data.train_path null -> {SAMPLE / 'train_groups.jsonl'}", "another checkpoint.dir",
          "train.allow_changed_data=true"], not_names=["data.train_split"]),
    Case("resume-changed-max-length-and-loss", train("data.max_length=128", "train.loss=pointwise"),
         ["data.max_length 256 -> 128", "train.loss listwise -> pointwise", "train.allow_changed_data=true"]),
    Case("resume-other-seed", train("train.seed=7", "train.allow_changed_data=true"),
         ["run/step-1 was trained with train.seed=1234", "this run has train.seed=7", "resume with train.seed=1234"]),
    # --- evaluate / rerank arguments (fail in argparse or the preflight checks)
    Case("top-k-zero", evaluate("--top-k", "0"), ["argument --top-k", "must be >= 1, got 0"]),
    Case("top-k-negative", evaluate("--top-k", "-3"), ["argument --top-k", "got -3"]),
    Case("batch-size-zero", evaluate("--batch-size", "0"), ["argument --batch-size"]),
    Case("evaluate-checkpoint-missing", evaluate(checkpoint=lambda c: c.work / "no-ckpt"), ["no-ckpt", "does not exist"]),
    Case("evaluate-data-missing", evaluate("--data", lambda c: str(c.work / "no-data")), ["--data", "no-data"]),
    Case("evaluate-split-missing", evaluate("--split", "dev"), ["--data", "qrels/dev.tsv", "splits there"]),
    Case("evaluate-run-missing", evaluate("--run", lambda c: str(c.work / "no-run.trec")), ["--run", "no-run.trec"]),
    Case("out-unwritable", evaluate("--out", lambda c: str(c.unwritable / "out" / "run.trec")),
         ["--out", "not writable"]),
    Case("out-is-a-folder", evaluate("--out", lambda c: str(c.work)), ["--out", "is a folder"]),
    Case("metrics-out-under-a-file", evaluate("--metrics-out", lambda c: str(c.blocker / "m.json")),
         ["--metrics-out", "blocker", "is a file"]),
    Case("rerank-without-out", evaluate(command="rerank", out=False), ["the following arguments are required: --out"]),
    Case("evaluate-override-bad", evaluate("data.max_length=abc"),
         ["command-line override data.max_length=abc", "expected an integer"]),
    # --- evaluate on bad data (fail after the model is loaded, before any output is written)
    Case("evaluate-run-unknown-doc", evaluate("--run", lambda c: str(c.work / "eval-unknown-doc.tsv")),
         ["eval-unknown-doc.tsv line 5", "candidate document 'missing-d", "not in the corpus"]),
    Case("evaluate-corpus-not-utf8", evaluate("--data", bad("test-corpus")),
         ["bad-test-corpus/corpus.jsonl line 3", "not valid UTF-8"]),
    Case("init-tiny-out-unwritable", lambda c: ["init-tiny", str(c.unwritable / "tiny-hf")],
         ["output folder", "not writable"]),
    # --- damaged checkpoints (each command names the damaged file; nothing is repaired or overwritten)
    Case("ckpt-latest-garbage", evaluate(checkpoint=bad("ck-latest-garbage")),
         ["ck-latest-garbage/latest", "step-9x", "newest intact checkpoint there is step-1"]),
    Case("ckpt-latest-garbage-resume", lambda c: ["train", TINY, f"checkpoint.dir={c.bad['ck-latest-garbage']}"],
         ["ck-latest-garbage/latest", "step-9x"]),
    Case("ckpt-train-state-missing", lambda c: ["train", TINY, "train.steps=2",
                                                f"checkpoint.dir={c.bad['ck-no-train-state']}"],
         ["ck-no-train-state/step-1/train_state/rank-0.pt is missing"]),
    Case("ckpt-config-edited", evaluate(checkpoint=bad("ck-config-edited")),
         ["ck-config-edited/step-1/config.yaml is damaged"]),
    Case("ckpt-shard-damaged", evaluate(checkpoint=bad("ck-shard-damaged")),
         ["ck-shard-damaged/step-1/model/__0_0.distcp is damaged"]),
    Case("ckpt-shard-damaged-resume", lambda c: ["train", TINY, "train.steps=2",
                                                 f"checkpoint.dir={c.bad['ck-shard-damaged']}"],
         ["ck-shard-damaged/step-1/model/__0_0.distcp is damaged"]),
    Case("ckpt-config-vs-tensors", evaluate("model.hidden_size=128"),
         ["tensor embedding.word_embeddings.weight has shape [320, 64]", "config.yaml implies [320, 128]"]),
    Case("ckpt-load-other-architecture", lambda c: ["train", TINY, "model.hidden_size=128", "model.ffn_hidden_size=256",
                                                    f"checkpoint.load={c.run_dir}",
                                                    f"checkpoint.dir={c.work.parent / f'{c.work.name}-other'}"],
         ["config.yaml has model.hidden_size = 64 but this run's config has 128"]),
    # --- quickstart (fails before its first step)
    Case("quickstart-workdir-under-a-file", lambda c: ["quickstart", "--workdir", str(c.blocker / "qs")],
         ["--workdir", "blocker", "is a file"]),
    Case("quickstart-data-missing", lambda c: ["quickstart", "--workdir", str(c.work / "qs"), "--data",
                                               str(c.work / "no-data")], ["--data", "no-data", "does not exist"]),
    Case("quickstart-step-fails", lambda c: ["quickstart", "--workdir", str(c.work.parent / f"{c.work.name}-qs"),
                                             "--data", str(c.bad["corpus"])],
         ["step `megarank train", "exited with code 2"], also=["megarank train: error: ", "corpus.jsonl line 7"]),
    Case("quickstart-bad-override", lambda c: ["quickstart", "--workdir", str(c.work / "qs"), "train.lr=abc"],
         ["command-line override train.lr=abc"]),
    Case("quickstart-workdir-not-empty", lambda c: ["quickstart", "--workdir", str(c.run_dir)],
         ["--workdir", "run is not empty", "never resumes", "pass --overwrite"]),
    Case("quickstart-overwrite-would-move-the-data", lambda c: ["quickstart", "--workdir", str(c.work), "--overwrite",
                                                                "--data", str(c.bad["corpus"])],
         ["--overwrite would move the current folder", "choose another --workdir"]),
]


def test_the_table_is_large_and_its_ids_unique():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_sentence_and_damages_nothing(ctx, case):
    _restore(ctx)
    before = _snapshot(ctx.work)
    argv = [str(a) for a in case.argv(ctx)]
    proc = subprocess.run([sys.executable, "-m", "megarank", *argv], cwd=ctx.work, env=ctx.env,
                          capture_output=True, text=True, timeout=300)
    shown = f"$ megarank {' '.join(argv)}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    assert proc.returncode == case.code, shown
    assert "Traceback" not in proc.stdout + proc.stderr, shown
    lines = proc.stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(f"megarank {argv[0]}: error: ")]
    assert len(starts) == 1, shown
    # the sentence, and the "  - key ..." items when a check lists several problems at once
    message = "\n".join([lines[starts[0]], *[ln for ln in lines[starts[0] + 1:] if ln.startswith("  - ")]])
    for name in case.names:
        assert name in message, f"{name!r} not in the error\n{shown}"
    for name in case.not_names:
        assert name not in message, f"{name!r} wrongly blamed\n{shown}"
    for name in case.also:
        assert name in proc.stderr, f"{name!r} not in stderr\n{shown}"
    after = _snapshot(ctx.work)
    changed = sorted(k for k in before if after.get(k) != before[k])
    added = sorted(k for k in after if k not in before)
    assert not changed and not added, f"changed: {changed}, added: {added}\n{shown}"
    assert ctx.prev_trec.read_text() == PREVIOUS_RUN and (ctx.run_dir / "latest").read_text().strip() == "step-1"
