"""Training groups at scale (issue 17 item 3): today's eager reader vs the indexed one, on a generated JSONL file
and the same groups as Parquet, a ``datasets`` folder and NeMo AutoModel's corpus-id form.

    .venv/bin/python benchmarks/data_bench.py [--groups 1000000] [--dir /tmp/megarank-data-bench]
        [--old-groups 100000] [--phases generate,index,ranks,train] [--out report.json]

- generate: ``--groups`` query groups (a query of 6-14 words, 1 positive and 4 negatives of 60-100 words, words
  drawn from a 5,000-word random vocabulary) written to ``DIR/groups-N.jsonl``, ``DIR/groups-N.parquet``
  (snappy, row groups of 65,536 rows), ``DIR/groups-N.hf`` (``datasets`` ``save_to_disk``, 4 shards) and
  ``DIR/groups-N.nemo/train.json`` (``nemo_corpus``: every passage a document of one Parquet corpus folder, the
  records naming them by id), outside the repository; kept for the next run. ``--formats`` picks which of the four
  the other phases measure.
- index: the index of each file built from nothing in a fresh process (wall time and that process's peak RSS,
  with the peaks of its anonymous and file-backed parts polled every 20 ms), then opened again (reuse).
- ranks: DP=2 without a model: two processes at once, each builds its source (``GroupsFileSource`` over the eager
  ``read_groups`` or the indexed ``open_groups``) and its DP sampler, then draws ``--draw-steps`` steps of a
  ``--global-batch`` global batch. Per rank: seconds from the start to its first step's groups, and the memory the
  data added over the process after its imports: RSS, anonymous RSS (private to the rank) and PSS (shared pages
  divided among the processes mapping them; the page cache of an indexed file is shared). The eager reader is run
  on the first ``--old-groups`` groups (a file of its own) when that is fewer than ``--groups``.
- train: ``megarank train configs/tiny.yaml`` under torchrun at DP=2 on each file (index already built):
  seconds from launch to the first step's log line, and each step's data wait (log line) against its step time
  (log timestamps), medians over the steps after the first two.

Numbers are measured on this machine as it was (other work may share the cores: the header shows the load).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, TINY_CONFIG, child_env, header, torchrun_cmd, write_json  # noqa: E402

GIB = 1 << 30
STEP = re.compile(r"^(?:\[rank0\]:)?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO megarank\.train: step (\d+)/\d+ \|"
                  r".*\| data wait ([\d.]+) ms", re.M)


# ----------------------------------------------------------------------------------------------- generate


def generate(folder: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """DIR/groups-N.jsonl and .parquet with the same groups (made once; an existing pair is kept)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl, parquet = folder / f"groups-{n}.jsonl", folder / f"groups-{n}.parquet"
    if jsonl.is_file() and parquet.is_file():
        return jsonl, parquet
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, size=int(k))) for k in rng.integers(2, 10, size=5000)]
    words = rng.zipf(1.3, size=4_000_000) % len(vocab)  # a long text to cut passages from (Zipf-like word use)
    text_words = [vocab[w] for w in words]
    starts = np.zeros(len(text_words) + 1, dtype=np.int64)
    np.cumsum([len(w) + 1 for w in text_words], out=starts[1:])
    text = " ".join(text_words)

    def cut(n_words):
        a = int(rng.integers(0, len(text_words) - 101))
        return text[starts[a]: starts[a + n_words] - 1]

    tmp_j, tmp_p = jsonl.with_suffix(".jsonl.tmp"), parquet.with_suffix(".parquet.tmp")
    chunk = 65536
    writer = None
    with open(tmp_j, "w", encoding="utf-8") as f:
        for first in range(0, n, chunk):
            rows = {"query": [], "pos_doc": [], "neg_doc": []}
            for _ in range(min(chunk, n - first)):
                rows["query"].append(cut(int(rng.integers(6, 15))))
                rows["pos_doc"].append([cut(int(rng.integers(60, 101)))])
                rows["neg_doc"].append([cut(int(rng.integers(60, 101))) for _ in range(4)])
            for q, p, ng in zip(rows["query"], rows["pos_doc"], rows["neg_doc"]):
                f.write(json.dumps({"query": q, "pos_doc": p, "neg_doc": ng}) + "\n")
            table = pa.table(rows)
            writer = writer or pq.ParquetWriter(tmp_p, table.schema, compression="snappy")
            writer.write_table(table, row_group_size=chunk)
    writer.close()
    os.replace(tmp_j, jsonl)
    os.replace(tmp_p, parquet)
    return jsonl, parquet


def hf_disk_copy(parquet: Path) -> Path:
    """The same rows as a ``datasets`` ``save_to_disk`` folder (4 shards), made once beside the Parquet file."""
    from datasets import Dataset
    import pyarrow.parquet as pq

    out = parquet.with_suffix(".hf")
    if not (out / "state.json").is_file():
        Dataset(pq.read_table(parquet)).save_to_disk(str(out), num_shards=4)
    return out


def nemo_copy(parquet: Path) -> Path:
    """The same groups in NeMo AutoModel's corpus-id form, made once beside the Parquet file: ``train.json`` whose
    records name their passages by id in ``corpus/`` (merlin_metadata.json + train.parquet, 5 documents per group,
    ids ``d0``, ``d1``, ...)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = parquet.with_suffix(".nemo")
    path = out / "train.json"
    if path.is_file():
        return path
    corpus = out / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    (corpus / "merlin_metadata.json").write_text(json.dumps({"class": "TextQADataset", "corpus_id": "gen"}))
    tmp_json, tmp_pq = path.with_suffix(".tmp"), corpus / "train.parquet.tmp"
    writer, doc = None, 0
    with open(tmp_json, "w", encoding="utf-8") as f:
        f.write('{"corpus": [{"path": "corpus"}], "data": [')
        for batch in pq.ParquetFile(parquet).iter_batches(batch_size=65536):
            ids, texts = [], []
            for q, pos, neg in zip(*(batch.column(c).to_pylist() for c in ("query", "pos_doc", "neg_doc"))):
                refs = []
                for text in pos + neg:
                    ids.append(f"d{doc}")
                    texts.append(text)
                    refs.append(f"d{doc}")
                    doc += 1
                f.write(("," if doc > len(refs) else "") + json.dumps({
                    "question_id": f"q{doc}", "question": q, "corpus_id": "gen",
                    "pos_doc": [{"id": r} for r in refs[:len(pos)]], "neg_doc": [{"id": r} for r in refs[len(pos):]]}))
            table = pa.table({"id": ids, "text": texts})
            writer = writer or pq.ParquetWriter(tmp_pq, table.schema, compression="snappy")
            writer.write_table(table, row_group_size=65536)
        f.write("]}")
    writer.close()
    os.replace(tmp_pq, corpus / "train.parquet")
    os.replace(tmp_json, path)
    return path


def head_jsonl(src: Path, n: int) -> Path:
    """The first n lines of a generated JSONL file (the eager reader's smaller input)."""
    out = src.with_name(f"groups-{n}-head-of-{src.stem}.jsonl")
    if not out.is_file():
        with open(src, "rb") as f, open(out.with_suffix(".tmp"), "wb") as g:
            for _, line in zip(range(n), f):
                g.write(line)
        os.replace(out.with_suffix(".tmp"), out)
    return out


def head_parquet(src: Path, n: int) -> Path:
    import pyarrow.parquet as pq

    out = src.with_name(f"groups-{n}-head-of-{src.stem}.parquet")
    if not out.is_file():
        pq.write_table(pq.read_table(src).slice(0, n), out.with_suffix(".tmp"), row_group_size=65536)
        os.replace(out.with_suffix(".tmp"), out)
    return out


# ----------------------------------------------------------------------------------------------- measuring


def memory() -> dict:
    """This process's RSS, anonymous RSS and PSS in bytes (/proc/self/status, /proc/self/smaps_rollup)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            out["Pss"] = int(line.split()[1]) * 1024
    return out


def child(args) -> dict:
    """One measurement in this (fresh) process: --child index | rank."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    from megarank.data import GroupSampler, GroupsFileSource, read_groups
    from megarank.data.formats import open_groups
    from megarank.data.formats.index import index_path

    fmt = ("hf_disk" if Path(args.file).is_dir() else "parquet" if args.file.endswith(".parquet")
           else "nemo_corpus" if args.file.endswith(".json") else "jsonl")
    if args.child == "index":
        idx = index_path(args.file)
        for p in (idx, Path(f"{idx}.arrow")):
            p.unlink(missing_ok=True)
        polled = {"RssAnon": 0, "RssFile": 0}  # the kernel keeps no high-water mark of these: polled every 20 ms
        done = threading.Event()

        def poll():
            while not done.is_set():
                now = memory()
                for key in polled:
                    polled[key] = max(polled[key], now[key])
                done.wait(0.02)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        t0 = time.perf_counter()
        groups, _ = open_groups(fmt, args.file)
        build = time.perf_counter() - t0
        done.set()
        poller.join()
        peak = memory()["VmHWM"]  # this process's own peak (ru_maxrss would carry the parent's across fork+exec)
        t0 = time.perf_counter()
        groups, _ = open_groups(fmt, args.file)
        reuse = time.perf_counter() - t0
        sizes = {p.name: p.stat().st_size for p in (idx, Path(f"{idx}.arrow")) if p.exists()}
        return {"file": args.file, "groups": len(groups), "build_s": build, "reuse_s": reuse, "peak_rss": peak,
                "peak_anon": polled["RssAnon"], "peak_file": polled["RssFile"], "index_bytes": sizes}
    import torch  # the trainer has it imported before it reads data: part of the baseline

    del torch
    base = memory()
    t0 = time.perf_counter()
    groups, _ = (read_groups if args.reader == "old" else open_groups)(fmt, args.file)
    source = GroupsFileSource(groups, 4, seed=1)
    sampler = GroupSampler(len(source), args.global_batch, args.rank, 2, seed=1)
    first = [source.get(i, e) for i, e in next(sampler)]
    first_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(args.draw_steps - 1):
        [source.get(i, e) for i, e in next(sampler)]
    per_step = (time.perf_counter() - t1) / max(args.draw_steps - 1, 1)
    after = memory()
    assert len(first) == args.global_batch // 2
    return {"file": args.file, "reader": args.reader, "rank": args.rank, "groups": len(source),
            "first_batch_s": first_s, "draw_s_per_step": per_step,
            **{f"added_{k}": after[k] - base[k] for k in ("VmRSS", "RssAnon", "RssFile", "Pss")},
            "after": after}


def run_child(*extra) -> dict:
    out = subprocess.run([sys.executable, __file__, *map(str, extra)], capture_output=True, text=True,
                         env=child_env(), cwd=REPO)
    if out.returncode:
        raise SystemExit(f"{extra}: exit {out.returncode}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ranks(file: Path, reader: str, args) -> list[dict]:
    """Two rank processes at once (DP=2)."""
    cmds = [[sys.executable, __file__, "--child", "rank", "--file", str(file), "--reader", reader, "--rank", str(r),
             "--global-batch", str(args.global_batch), "--draw-steps", str(args.draw_steps)] for r in range(2)]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
                              cwd=REPO) for c in cmds]
    outs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode:
            raise SystemExit(f"rank of {file} ({reader}): exit {p.returncode}\n{err[-3000:]}")
    return [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]


def train(file: Path, fmt: str, steps: int, work: Path) -> dict:
    """megarank train (tiny config) at DP=2 on `file`: launch -> first step seconds, data wait vs step time."""
    log_path = work / f"train-{file.name}.log"
    cmd = torchrun_cmd(2, "-m", "megarank", "train", str(TINY_CONFIG), f"data.format={fmt}",
                       f"data.train_path={file}", f"train.steps={steps}", "train.log_interval=1",
                       "train.global_batch_size=4", "train.micro_batch_size=2")  # no checkpoint.dir: no saving
    t0 = time.time()
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO).returncode
    text = log_path.read_text()
    if rc:
        raise SystemExit(f"train on {file}: exit {rc}; see {log_path}")
    rows = [(datetime.datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f").timestamp(), int(s), float(w) / 1000)
            for t, s, w in STEP.findall(text)]
    step_s = [b[0] - a[0] for a, b in zip(rows, rows[1:]) if a[1] >= 2]
    waits = [w for _, s, w in rows if s > 2]
    return {"file": str(file), "log": str(log_path), "launch_to_first_step_s": rows[0][0] - t0,
            "step_s_median": statistics.median(step_s), "data_wait_s_median": statistics.median(waits),
            "data_wait_s_max": max(waits), "wait_share_median": statistics.median(waits) / statistics.median(step_s),
            "steps": len(rows)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", type=int, default=1_000_000)
    p.add_argument("--old-groups", type=int, default=100_000, help="groups the eager reader is measured on")
    p.add_argument("--dir", default="/tmp/megarank-data-bench")
    p.add_argument("--phases", default="generate,index,ranks,train")
    p.add_argument("--formats", default="jsonl,parquet,hf_disk,nemo_corpus")
    p.add_argument("--global-batch", type=int, default=128)
    p.add_argument("--draw-steps", type=int, default=20)
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--out")
    p.add_argument("--child", choices=["index", "rank"], help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    p.add_argument("--reader", choices=["old", "new"], help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    print(header())
    phases = args.phases.split(",")
    folder = Path(args.dir)
    t0 = time.time()
    jsonl, parquet = generate(folder, args.groups)
    formats = args.formats.split(",")
    hf = hf_disk_copy(parquet) if "hf_disk" in formats else None
    nemo = nemo_copy(parquet) if "nemo_corpus" in formats else None
    sizes = [f"{jsonl} ({jsonl.stat().st_size / GIB:.2f} GiB)", f"{parquet} ({parquet.stat().st_size / GIB:.2f} GiB)"]
    if hf:
        sizes.append(f"{hf} ({sum(f.stat().st_size for f in hf.rglob('*.arrow')) / GIB:.2f} GiB)")
    if nemo:
        sizes.append(f"{nemo.parent} ({sum(f.stat().st_size for f in nemo.parent.rglob('*')) / GIB:.2f} GiB)")
    print(f"data: {', '.join(sizes)}{f'; generated in {time.time() - t0:.0f} s' if 'generate' in phases else ''}",
          flush=True)
    chosen = [(fmt, f) for fmt, f in (("jsonl", jsonl), ("parquet", parquet), ("hf_disk", hf), ("nemo_corpus", nemo))
              if fmt in formats]
    report = {"groups": args.groups, "jsonl_bytes": jsonl.stat().st_size, "parquet_bytes": parquet.stat().st_size}
    if "index" in phases:
        report["index"] = [run_child("--child", "index", "--file", f) for _, f in chosen]
        for r in report["index"]:
            print(f"index {Path(r['file']).name}: built in {r['build_s']:.1f} s (peak RSS of the builder "
                  f"{r['peak_rss'] / GIB:.2f} GiB; polled peaks: anonymous {r['peak_anon'] / GIB:.2f}, file-backed "
                  f"{r['peak_file'] / GIB:.2f}), reopened in {r['reuse_s']:.3f} s; {r['index_bytes']}", flush=True)
    if "ranks" in phases:
        report["ranks"] = []
        small = args.old_groups < args.groups
        heads = {"jsonl": lambda: head_jsonl(jsonl, args.old_groups),
                 "parquet": lambda: head_parquet(parquet, args.old_groups),
                 "hf_disk": lambda: hf,  # a save_to_disk folder is memory-mapped by the old reader: measured whole
                 "nemo_corpus": lambda: nemo}  # measured whole too (a head would need its own corpus)
        for fmt, new_file in chosen:
            old_file = heads[fmt]() if small else new_file
            for reader, file in (("old", old_file), ("new", new_file)):
                if reader == "new":
                    if not Path(f"{file}.megarank-index").exists():
                        run_child("--child", "index", "--file", file)
                rows = ranks(file, reader, args)
                report["ranks"].extend(rows)
                print(f"DP=2 {fmt} {reader} reader, {rows[0]['groups']} groups: first batch "
                      f"{max(r['first_batch_s'] for r in rows):.2f} s; added per rank: RSS "
                      f"{max(r['added_VmRSS'] for r in rows) / GIB:.3f} GiB, anon "
                      f"{max(r['added_RssAnon'] for r in rows) / GIB:.3f} GiB, PSS "
                      f"{max(r['added_Pss'] for r in rows) / GIB:.3f} GiB; drawing "
                      f"{1000 * max(r['draw_s_per_step'] for r in rows):.1f} ms per step of {args.global_batch // 2} "
                      "groups", flush=True)
    if "train" in phases:
        report["train"] = [train(f, fmt, args.train_steps, folder) for fmt, f in chosen]
        for r in report["train"]:
            print(f"train tiny DP=2 {Path(r['file']).name}: launch -> first step {r['launch_to_first_step_s']:.1f} s; "
                  f"step {1000 * r['step_s_median']:.1f} ms, data wait {1000 * r['data_wait_s_median']:.2f} ms median "
                  f"({100 * r['wait_share_median']:.2f}% of the step), max {1000 * r['data_wait_s_max']:.2f} ms",
                  flush=True)
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
