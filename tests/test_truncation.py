"""Truncation of a pair over data.max_length (docs/data.md#truncation, megarank/data/truncation.py): the passage is
cut first, the query only down to data.max_query_length, the template's text never; exact in tokens, the same in
training, scoring and the export's tokenizer class, with one count line per run / command."""
from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import pytest
import torch

from megarank.data import DataError, PairTokenizer, build_tiny_tokenizer
from megarank.data.template import format_pair
from megarank.data.tokenizer_factory import tiny_tokenizer_dir

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
BOS = 256
HEAD, SEP = "question:", " \n \n passage:"  # the default template's text: 9 + 13 bytes = 22 tokens (+ BOS = 23)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_tokenizer(tiny_tokenizer_dir())


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def pair_ids(tok, query, passage):
    """BOS + the template's bytes around the given (already cut) query and passage."""
    return [BOS, *ids(tok, HEAD + query + SEP + passage)]


def test_default_query_budget_is_half_of_what_the_template_leaves(tiny):
    assert PairTokenizer(tiny, max_length=512).max_query_length == (512 - 23) // 2 == 244
    assert PairTokenizer(tiny, max_length=64).max_query_length == (64 - 23) // 2 == 20
    assert PairTokenizer(tiny, max_length=64, max_query_length=30).max_query_length == 30


def test_a_pair_that_fits_is_the_whole_string(tiny):
    pt = PairTokenizer(tiny, max_length=64)
    query, passage = "q" * 20, "p" * 21  # 23 + 41 = 64 tokens: exactly max_length
    assert pt.encode([query], [passage]) == [pair_ids(tiny, query, passage)]
    assert (pt.truncation.pairs, pt.truncation.query_cut, pt.truncation.passage_cut) == (1, 0, 0)


def test_a_long_passage_is_cut_on_the_right(tiny):
    pt = PairTokenizer(tiny, max_length=64)
    passage = "".join(chr(97 + i % 26) for i in range(300))
    full = pair_ids(tiny, "short query", passage)
    assert pt.encode(["short query"], [passage]) == [full[:64]]  # what right-truncating the whole string gives
    assert (pt.truncation.query_cut, pt.truncation.passage_cut) == (0, 1)


def test_a_long_query_keeps_the_passage(tiny):
    """The query is cut only as far as the passage needs room: here the whole passage stays."""
    pt = PairTokenizer(tiny, max_length=64)
    query = "".join(chr(65 + i % 26) for i in range(100))
    passage = "the passage"  # 11 tokens: the query keeps 64 - 23 - 11 = 30 (> its budget of 20)
    assert pt.encode([query], [passage]) == [pair_ids(tiny, query[:30], passage)]
    assert (pt.truncation.query_cut, pt.truncation.passage_cut) == (1, 0)
    # the old rule (the whole string cut on the right) would have kept no passage token at all
    assert pair_ids(tiny, query, passage)[:64] == [BOS, *ids(tiny, HEAD + query)[:63]]


def test_both_long_the_query_keeps_its_budget_and_the_passage_the_rest(tiny):
    pt = PairTokenizer(tiny, max_length=64)
    query, passage = "Q" * 100, "P" * 100
    assert pt.encode([query], [passage]) == [pair_ids(tiny, "Q" * 20, "P" * 21)]
    explicit = PairTokenizer(tiny, max_length=64, max_query_length=5)
    assert explicit.encode([query], [passage]) == [pair_ids(tiny, "Q" * 5, "P" * 36)]
    assert (explicit.truncation.pairs, explicit.truncation.query_cut, explicit.truncation.passage_cut) == (1, 1, 1)


def test_template_text_after_the_passage_is_kept(tiny):
    template = "Query: {query}\nDocument: {passage}\nRelevant:"
    pt = PairTokenizer(tiny, max_length=64, template=template)
    fixed = len(ids(tiny, template.format(query="", passage="")))  # 28
    row = pt.encode(["what"], ["P" * 100])[0]
    assert len(row) == 64 and tiny.decode(row[1:]).endswith("P\nRelevant:")
    assert row == [BOS, *ids(tiny, template.format(query="what", passage="P" * (63 - fixed - 4)))]


def test_multibyte_characters_are_cut_in_tokens(tiny):
    """Exact in tokens: a byte-level tokenizer may cut inside a character (what training saw is what is scored)."""
    pt = PairTokenizer(tiny, max_length=40, max_query_length=3)
    query, passage = "ééééé", "ü" * 30  # 2 tokens each
    row = pt.encode([query], [passage])[0]
    assert len(row) == 40
    assert row == [BOS, *ids(tiny, HEAD), *ids(tiny, query)[:3], *ids(tiny, SEP), *ids(tiny, passage)[:14]]


def test_budgets_that_leave_no_room_are_rejected_naming_the_key(tiny):
    with pytest.raises(DataError, match=r"data\.max_query_length=41 leaves the passage no token: .* set "
                                        r"data\.max_query_length below 41"):
        PairTokenizer(tiny, max_length=64, max_query_length=41)
    PairTokenizer(tiny, max_length=64, max_query_length=40)  # one passage token left
    with pytest.raises(DataError, match=r"data\.max_length=20 is too short for data\.template"):
        PairTokenizer(tiny, max_length=20)


def test_config_key_is_validated_and_documented():
    from megarank.config import ConfigError, config_help, load_config, validate

    with pytest.raises(ConfigError, match=r"data\.max_query_length must be null or in \[1, data\.max_length - 1\)"):
        validate(load_config(TINY, ["data.max_query_length=600", "data.max_length=512"]), check_environment=False)
    validate(load_config(TINY, ["data.max_query_length=128"]), check_environment=False)
    assert "max_query_length: null  # Tokens a query keeps however long its passage" in config_help()


def test_counts_and_one_warning_per_key(tiny, caplog):
    pt = PairTokenizer(tiny, max_length=64)
    queries = ["Q" * 100, "short", "Q" * 100, "a"]
    passages = ["P" * 100, "P" * 100, "pp", "b"]
    pt.lengths(queries, passages)  # measuring (scoring's first pass) counts nothing
    assert pt.truncation.pairs == 0
    before = pt.truncation.copy()
    pt.encode(queries, passages)
    assert (pt.truncation.pairs, pt.truncation.query_cut, pt.truncation.passage_cut) == (4, 2, 2)
    with caplog.at_level(logging.WARNING, logger="megarank.data.tokenizer"):
        pt.log_truncation_once("evaluation", "test pairs scored", since=before)
        pt.encode(queries, passages)
        pt.log_truncation_once("evaluation", "test pairs scored", since=before)  # same key: silent
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["data: 2 of 4 test pairs scored had their query cut (to no fewer than data.max_query_length=20 "
                     "tokens); 2 had their passage cut to fit data.max_length=64 (docs/data.md#truncation)"]
    assert pt.truncation_message("x", since=pt.truncation.copy()) is None  # nothing cut since: no line


def test_training_and_scoring_batches_carry_the_same_ids(tiny):
    """The training batcher and the scoring batcher (Reranker.score, evaluate, mine) encode through one rule."""
    from megarank.data.batcher import Batcher

    pt = PairTokenizer(tiny, max_length=64)
    query = "a long query " * 20
    passages = ["the first passage " * 10, "second", "a third one " * 3]
    train = Batcher(pt).micro_batches([(query, passages)], micro_batch_size=1)[0]
    corpus = dict(enumerate(passages))
    scored = {}
    for keys, batch in Batcher(pt).scoring_batches([("q", i) for i in corpus], {"q": query}, corpus, batch_size=1):
        scored[keys[0][1]] = batch["input_ids"][0][batch["attention_mask"][0]].tolist()
    for i, row in enumerate(train["input_ids"]):
        want = row[train["attention_mask"][i]].tolist()
        assert want == scored[i] == pt.encode([query], [passages[i]], count=False)[0]
    assert len({tuple(r) for r in scored.values()}) == 3  # every passage reaches the model


def test_reranker_scores_see_the_passage_and_log_once(caplog):
    """Reranker.score: a query longer than max_length no longer gives every passage the same score, and the
    first call that cuts pairs logs their count (later calls only count)."""
    from megarank import Reranker

    reranker = Reranker.from_config(TINY, ["model.dtype=fp32", "data.max_length=64"])
    try:
        query = "a query far longer than max_length " * 10
        with caplog.at_level(logging.WARNING, logger="megarank.data.tokenizer"):
            first = reranker.score([(query, "passage one"), (query, "other passage")])
            reranker.score([(query, "passage one")])
        assert first[0].item() != first[1].item()
        lines = [r.getMessage() for r in caplog.records if "had their query cut" in r.getMessage()]
        assert lines == ["data: 2 of 2 pairs scored had their query cut (to no fewer than data.max_query_length=20 "
                         "tokens); 0 had their passage cut to fit data.max_length=64 (docs/data.md#truncation)"]
        t = reranker.pair_tokenizer.truncation
        assert (t.pairs, t.query_cut, t.passage_cut) == (3, 3, 0)
    finally:
        reranker.close()


def test_training_logs_the_counts_of_every_data_parallel_replica_once(tiny, one_rank, caplog):
    from megarank.training.loop import _log_truncation

    pt = PairTokenizer(tiny, max_length=64)
    pt.encode(["Q" * 100] * 3 + ["q"] * 2, ["P" * 100] * 5)
    with caplog.at_level(logging.WARNING, logger="megarank.train"):
        _log_truncation(pt)
    assert [r.getMessage() for r in caplog.records] == [
        "data: 3 of 5 training pairs so far had their query cut (to no fewer than data.max_query_length=20 tokens); "
        "5 had their passage cut to fit data.max_length=64 (docs/data.md#truncation)"]


# ------------------------------------------------------------------------------- real tokenizers, the export's class


def real_tokenizer_dirs():
    """The tiny byte-level tokenizer, and SmolLM2's BPE tokenizer when its cache is built (scripts/
    build_smollm2_cache.py; tests/test_convert_smollm2.py builds it)."""
    out = [pytest.param("tiny", id="tiny")]
    smol = Path.home() / ".cache" / "megarank" / "smollm2-135m"
    marks = [] if (smol / "tokenizer.json").is_file() else [pytest.mark.skip(reason=f"{smol} is not built")]
    out.append(pytest.param(str(smol), id="smollm2", marks=marks))
    return out


def random_text(rng, n):
    words = ["the", "reranker", "reads", "one", "string:", "query", "and", "passage,", "cut", "ünïcode", "42", "x",
             "\n", "  ", "?", "passage:", "question:", "{query}", "naïve", "end."]
    return " ".join(rng.choice(words) for _ in range(n))


@pytest.fixture(scope="module")
def export_tokenizers(tmp_path_factory, tiny):
    """name -> (the folder as an export carries it, its tokenizer loaded with trust_remote_code)."""
    from transformers import AutoTokenizer

    from checkpoint_tools.tokenizer_files import copy_tokenizer, prepare_reranker_tokenizer

    out = {}
    for param in real_tokenizer_dirs():
        name = param.values[0]
        src = tiny_tokenizer_dir() if name == "tiny" else Path(name)
        if not (src / "tokenizer.json").is_file():
            continue
        folder = tmp_path_factory.mktemp("export") / Path(name).name
        copy_tokenizer(src, folder)
        prepare_reranker_tokenizer(folder, "question:{query} \n \n passage:{passage}", 96)
        shutil.copy2(ROOT / "checkpoint_tools" / "hf_modeling" / "tokenization_megarank.py", folder)
        out[name] = (folder, AutoTokenizer.from_pretrained(folder, trust_remote_code=True))
    return out


@pytest.mark.parametrize("name", real_tokenizer_dirs())
def test_rule_holds_on_random_pairs_and_the_export_class_agrees(name, export_tokenizers):
    from megarank.data import load_tokenizer
    from megarank.data.truncation import field_spans

    folder, exported = export_tokenizers[name]
    tok = load_tokenizer(folder)
    rng = random.Random(0)
    pt = PairTokenizer(tok, max_length=96)
    assert exported.query_budget(96) == pt.max_query_length  # the export's tokenizer_config.json records it
    pairs = [(random_text(rng, rng.randint(0, 60)), random_text(rng, rng.randint(0, 60))) for _ in range(150)]
    queries, passages = [q for q, _ in pairs], [p for _, p in pairs]
    rows = pt.encode(queries, passages)
    assert exported(queries, passages, truncation=True)["input_ids"] == rows
    for (q, p), row in zip(pairs, rows):
        full = [pt.bos_id, *ids(tok, format_pair(q, p))]
        assert len(row) <= 96 and row[0] == pt.bos_id
        if len(full) <= 96:
            assert row == full
            continue
        assert len(row) == 96  # exact in tokens: the cut fills max_length
        # the kept ids are the whole string's ids minus the ends of the query's and the passage's, in order
        text, q_spans, p_spans = field_spans(pt.template, q, p)
        offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        owners = ["q" if q_spans[0][0] <= a < q_spans[0][1] else "p" if p_spans[0][0] <= a < p_spans[0][1] else ""
                  for a, _ in offsets]
        nq, np_ = owners.count("q"), owners.count("p")
        room = 95 - (len(owners) - nq - np_)
        q_keep = min(nq, max(pt.max_query_length, room - np_))  # docs/data.md#truncation
        want, seen = [], {"q": 0, "p": 0}
        for token, who in zip(full[1:], owners):
            seen[who] = seen.get(who, 0) + 1
            if who == "" or seen[who] <= (q_keep if who == "q" else room - q_keep):
                want.append(token)
        assert row == [pt.bos_id, *want]
        assert q_keep >= min(nq, pt.max_query_length) and room - q_keep >= min(np_, room - pt.max_query_length)


def test_export_class_tokenizes_a_chat_template_in_one_call_like_megarank(export_tokenizers):
    from megarank.data import load_tokenizer

    folder, exported = export_tokenizers["tiny"]
    pt = PairTokenizer(load_tokenizer(folder), max_length=96)
    pairs = [("Q" * 200, "the passage"), ("short", "P" * 200), ("a", "b")]
    rows = pt.encode([q for q, _ in pairs], [p for _, p in pairs])
    msgs = [[{"role": "query", "content": q}, {"role": "document", "content": [{"type": "text", "text": p}]}]
            for q, p in pairs]
    batch = exported.apply_chat_template(msgs, tokenize=True, truncation=True, padding=True, return_dict=True,
                                         return_tensors="pt")
    assert [r[m.bool()].tolist() for r, m in zip(batch["input_ids"], batch["attention_mask"])] == rows
    assert exported([list(p) for p in pairs], truncation=True)["input_ids"] == rows
    # rendered to a string first, the chat template is tokenized as one text: cut on the right (documented)
    text = exported.apply_chat_template(msgs[0], tokenize=False)
    right = exported(text, add_special_tokens=False, truncation=True)["input_ids"]
    assert right != rows[0] and right == [BOS, *ids(exported, format_pair(*pairs[0]))][:96]
    # without truncation a pair is the whole string, uncut, as before
    assert exported(*pairs[0])["input_ids"] == [BOS, *ids(exported, format_pair(*pairs[0]))]
    assert isinstance(exported(*pairs[2], truncation=True, return_tensors="pt")["input_ids"], torch.Tensor)


def test_megarank_cut_does_not_trigger_transformers_length_warning():
    """transformers warns once per tokenizer that a text over model_max_length 'will result in indexing errors';
    encode cuts its rows itself, so that warning stays for the user's own calls."""
    from megarank.data import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir())
    tok.model_max_length = 50
    PairTokenizer(tok, max_length=48).encode(["Q" * 100], ["P" * 100])
    assert not tok.deprecation_warnings.get("sequence-length-is-longer-than-the-specified-maximum")
    tok("x" * 60)
    assert tok.deprecation_warnings.get("sequence-length-is-longer-than-the-specified-maximum")
