"""The tiny byte-level tokenizer, tokenizer loading, and pair encoding rules (docs/architecture.md, "The input")."""

import pytest
import torch

from megarank.data import DEFAULT_TEMPLATE, DataError, PairTokenizer, build_tiny_tokenizer, format_pair, load_tokenizer

BOS_ID, EOS_ID, PAD_ID = 256, 257, 258


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tiny")


def text_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_tiny_tokenizer_is_byte_level_with_llama_specials(tiny):
    assert (tiny.bos_token_id, tiny.eos_token_id, tiny.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    assert len(tiny) == 259
    assert (tiny.bos_token, tiny.eos_token, tiny.pad_token) == ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>")
    assert text_ids(tiny, "hé!") == [104, 0xC3, 0xA9, 33]  # token id == UTF-8 byte value
    assert tiny.decode(text_ids(tiny, "any text: ünïcode \n ok")) == "any text: ünïcode \n ok"


def test_build_is_deterministic_and_reuses_existing_folder(tmp_path):
    a = build_tiny_tokenizer(tmp_path / "a")
    build_tiny_tokenizer(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    stamp = (tmp_path / "a" / "tokenizer.json").stat().st_mtime_ns
    again = build_tiny_tokenizer(tmp_path / "a")  # exists and loads: loaded, not rebuilt
    assert (tmp_path / "a" / "tokenizer.json").stat().st_mtime_ns == stamp
    assert text_ids(again, "same ids") == text_ids(a, "same ids")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temporary folders left behind


def test_load_tokenizer_errors_name_the_folder(tmp_path):
    with pytest.raises(DataError, match=r"nowhere: tokenizer folder does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no tokenizer files found"):
        load_tokenizer(tmp_path / "empty")


def test_pair_is_one_templated_string_with_bos_and_no_eos(tiny):
    batch = PairTokenizer(tiny)(["what is jazz"], ["music from new orleans"])
    ids = batch["input_ids"][0][batch["attention_mask"][0]].tolist()
    expected_text = "question:what is jazz \n \n passage:music from new orleans"
    assert format_pair("what is jazz", "music from new orleans") == expected_text
    assert DEFAULT_TEMPLATE == "question:{query} \n \n passage:{passage}"
    assert ids == [BOS_ID, *text_ids(tiny, expected_text)]
    assert ids.count(BOS_ID) == 1 and EOS_ID not in ids


def test_custom_template(tiny):
    batch = PairTokenizer(tiny, template="Q: {query} | D: {passage}")(["q"], ["d"])
    assert tiny.decode(batch["input_ids"][0][1:batch["attention_mask"][0].sum()]) == "Q: q | D: d"


def test_right_truncation_keeps_bos_and_max_length(tiny):
    passage = "x" * 100 + "END"
    full = [BOS_ID, *text_ids(tiny, format_pair("query", passage))]
    # >= 24: BOS + template text take 23; the 5-token query is within max_query_length, so only the passage is cut
    batch = PairTokenizer(tiny, max_length=32, max_query_length=5)(["query"], [passage])
    assert batch["input_ids"].shape == (1, 32)
    assert batch["input_ids"][0].tolist() == full[:32]  # the start is kept, the end is cut
    assert batch["attention_mask"].all()


def test_padding_to_multiple_of_8_and_attention_mask(tiny):
    pt = PairTokenizer(tiny, max_length=512)
    queries, passages = ["a", "longer query"], ["b", "a passage that is clearly longer than the first"]
    lengths = pt.lengths(queries, passages)
    batch = pt(queries, passages)
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.bool
    seq = batch["input_ids"].shape[1]
    assert seq % 8 == 0 and max(lengths) <= seq < max(lengths) + 8
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
        assert (batch["input_ids"][row, n:] == PAD_ID).all()


def test_sequence_never_exceeds_rounded_max_length(tiny):
    batch = PairTokenizer(tiny, max_length=29)(["q" * 50], ["p" * 50])
    assert batch["input_ids"].shape == (1, 32)  # 29 real tokens, padded up to the multiple of 8
    assert batch["attention_mask"].sum().item() == 29


class StubTokenizer:
    """Just what PairTokenizer uses: ids are character codes."""

    def __init__(self, bos=1, pad=None, eos=None):
        self.bos_token_id, self.pad_token_id, self.eos_token_id = bos, pad, eos

    def __call__(self, texts, add_special_tokens):
        assert add_special_tokens is False
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


@pytest.mark.parametrize("pad,eos,expected", [(5, 7, 5), (None, 7, 7), (None, None, 0)])
def test_pad_id_falls_back_to_eos_then_zero(pad, eos, expected):
    batch = PairTokenizer(StubTokenizer(pad=pad, eos=eos), template="{query}{passage}")(["ab", "a"], ["c", ""])
    assert batch["input_ids"].tolist() == [[1, 97, 98, 99] + [expected] * 4, [1, 97] + [expected] * 6]


def test_tokenizer_without_bos_is_rejected():
    with pytest.raises(ValueError, match="no BOS token"):
        PairTokenizer(StubTokenizer(bos=None))


def test_mismatched_inputs_are_rejected(tiny):
    with pytest.raises(ValueError, match="2 queries but 1 passages"):
        PairTokenizer(tiny)(["a", "b"], ["c"])
