"""Tokenizers: the built-in tiny byte-level one, loading a model's own, and pair encoding for the reranker.

Pair encoding follows docs/architecture.md: the pair is ONE string made by the template, tokenized without special
tokens, BOS prepended explicitly, no EOS, right-padded; a row over max_length loses passage tokens first, then query
tokens down to max_query_length, never the template's text (data/truncation.py, docs/data.md#truncation).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from .errors import DataError
from .template import DEFAULT_TEMPLATE, format_pair
from .truncation import TruncationCounts, cut_row, field_spans

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"

# Files any one of which makes a folder loadable by AutoTokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tiktoken.model")


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the alphabet of the ByteLevel pre-tokenizer)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _tiny_backend():
    """The `tokenizers` object: byte b has id b; BOS/EOS/PAD are ids 256/257/258."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    byte_chars = _byte_to_unicode()
    # A BPE model with no merges splits every pre-token into single byte characters.
    tok = Tokenizer(models.BPE(vocab={byte_chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS, EOS, PAD)])
    return tok


def build_tiny_tokenizer(out_dir: str | os.PathLike):
    """Build (or load, if already built) the byte-level tokenizer of the built-in tiny model in `out_dir`.

    Deterministic and offline. Saved atomically: written to a temporary sibling folder, then renamed.
    """
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()):
        return load_tokenizer(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_tiny_backend(), bos_token=BOS, eos_token=EOS, pad_token=PAD)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tokenizer.save_pretrained(tmp)
        _portable_config(tmp / "tokenizer_config.json")
        tmp.chmod(0o755)  # mkdtemp makes it 0700; copies of it land in every checkpoint
        os.replace(tmp, out)  # replaces an empty out_dir too
    except OSError:
        if not (out.is_dir() and any(out.iterdir())):  # not a lost race with another process: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(out)


def _portable_config(config_path: Path) -> None:
    """Name the generic fast-tokenizer class so that transformers 4.x and 5.x both load the folder."""
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_tokenizer(path: str | os.PathLike):
    """AutoTokenizer.from_pretrained on a local folder, with a clear error when it holds no tokenizer."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{folder}: tokenizer folder does not exist")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise DataError(f"{folder}: no tokenizer files found (expected one of {', '.join(_TOKENIZER_FILES)})")
    return AutoTokenizer.from_pretrained(str(folder))


def round_up(n: int, multiple: int | None) -> int:
    """`n` rounded up to a multiple of `multiple` (unchanged when multiple is None or 1)."""
    if not multiple or multiple <= 1:
        return n
    return -(-n // multiple) * multiple


class PairTokenizer:
    """Encodes (query, passage) pairs into padded `input_ids` / `attention_mask` batches for the reranker."""

    def __init__(self, tokenizer, max_length: int = 512, pad_to_multiple_of: int | None = 8,
                 template: str = DEFAULT_TEMPLATE, max_query_length: int | None = None):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if tokenizer.bos_token_id is None:
            raise ValueError("the tokenizer has no BOS token, but reranker inputs must start with BOS")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.template = template
        self.bos_id = tokenizer.bos_token_id
        self.pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
        self.max_query_length = self._query_budget(max_query_length)
        self.truncation = TruncationCounts()  # pairs encoded (count=True), and those whose query / passage was cut
        self._logged: set = set()  # the log_truncation_once keys already logged

    def _query_budget(self, requested: int | None) -> int:
        """data.max_query_length, or by default half of the tokens BOS and the template's text leave; rejects a
        max_length that the template fills, and a query budget that leaves the passage no token.

        Without room for the passage every passage of a group reads the same and the listwise loss stays at
        ln(n_passages) without a word; this is only knowable with the real tokenizer."""
        empty = self.template.format(query="", passage="")
        fixed = 1 + len(self.tokenizer([empty], add_special_tokens=False)["input_ids"][0])
        if fixed >= self.max_length:
            raise DataError(
                f"data.max_length={self.max_length} is too short for data.template: BOS and the template's own text "
                f"({empty!r}) already take {fixed} tokens, so every passage would be cut off; "
                f"set data.max_length well above {fixed} (e.g. {max(2 * fixed, 128)}) or shorten the template")
        room = self.max_length - fixed  # tokens the query and the passage share
        if requested is None:
            return max(room // 2, 1)
        if requested >= room:
            raise DataError(
                f"data.max_query_length={requested} leaves the passage no token: data.max_length={self.max_length} "
                f"minus BOS and the template's text ({fixed} tokens) leaves {room} for query and passage; set "
                f"data.max_query_length below {room} (null = half of it, {max(room // 2, 1)})")
        return requested

    def encode(self, queries: Sequence[str], passages: Sequence[str], count: bool = True) -> list[list[int]]:
        """Token ids per pair: BOS + tokens of the formatted string, the passage (then the query, down to
        max_query_length) cut from its end so that the row fits max_length (data/truncation.py). ``count``: add
        the pairs to ``self.truncation`` (False when the same pairs are encoded again, e.g. ``lengths``)."""
        if len(queries) != len(passages):
            raise ValueError(f"got {len(queries)} queries but {len(passages)} passages")
        if not queries:
            return []
        texts = [format_pair(q, p, self.template) for q, p in zip(queries, passages)]
        ids = self._uncut(texts)["input_ids"]
        keep = self.max_length - 1
        long = [i for i, row in enumerate(ids) if len(row) > keep]
        n_query = n_passage = 0
        if long:
            offsets = self._offsets([texts[i] for i in long])
            for i, row_offsets in zip(long, offsets):
                _, q_spans, p_spans = field_spans(self.template, queries[i], passages[i])
                ids[i], query_cut, passage_cut = cut_row(ids[i], row_offsets, q_spans, p_spans, keep,
                                                         self.max_query_length)
                n_query += query_cut
                n_passage += passage_cut
        if count:
            self.truncation.pairs += len(ids)
            self.truncation.query_cut += n_query
            self.truncation.passage_cut += n_passage
        return [[self.bos_id, *row] for row in ids]

    def _uncut(self, texts: list[str], **kwargs):
        """The tokenizer on whole strings, without transformers' "longer than the specified maximum sequence length
        ... indexing errors" warning (model_max_length): ``encode`` cuts the rows itself."""
        seen = getattr(self.tokenizer, "deprecation_warnings", None)
        key = "sequence-length-is-longer-than-the-specified-maximum"
        warned = seen.get(key, False) if isinstance(seen, dict) else None
        if warned is not None:
            seen[key] = True
        try:
            return self.tokenizer(texts, add_special_tokens=False, **kwargs)
        finally:
            if warned is not None:
                seen[key] = warned

    def _offsets(self, texts: list[str]) -> list:
        try:
            return self._uncut(texts, return_offsets_mapping=True)["offset_mapping"]
        except (NotImplementedError, TypeError, KeyError) as e:
            raise DataError(f"truncating a pair to data.max_length needs a fast tokenizer (character offsets); "
                            f"{type(self.tokenizer).__name__} has none ({e})") from None

    def truncation_message(self, what: str, since: TruncationCounts | None = None) -> str | None:
        """The one log line about the pairs cut so far (or since the ``since`` snapshot), None when none was."""
        counts = self.truncation - since if since is not None else self.truncation
        return counts.message(what, self.max_query_length, self.max_length)

    def log_truncation_once(self, key: str, what: str, since: TruncationCounts | None = None,
                            enabled: bool = True) -> None:
        """Warn how many pairs were cut (since ``since``), once per ``key`` for this tokenizer (a command, a
        training run's evaluations): later calls with the same key say nothing. ``enabled``: this rank logs."""
        if key in self._logged:
            return
        message = self.truncation_message(what, since)
        if message is None:
            return
        self._logged.add(key)
        if enabled:
            log.warning("%s", message)

    def lengths(self, queries: Sequence[str], passages: Sequence[str]) -> list[int]:
        """Token count of each pair after truncation (BOS included), e.g. for length-sorted batching."""
        return [len(row) for row in self.encode(queries, passages, count=False)]

    def pad(self, rows: Sequence[Sequence[int]], multiple: int = 0) -> dict[str, torch.Tensor]:
        """Right-pad id lists to the longest rounded up to ``multiple`` (default pad_to_multiple_of; the batcher
        passes a multiple of it under context parallelism). On every layout: pipeline stages exchange each batch's
        shape, see ``variable_seq_lengths`` in model/transformer_config.py."""
        if not rows:
            raise ValueError("cannot pad an empty batch")
        seq = round_up(max(len(r) for r in rows), multiple or self.pad_to_multiple_of)
        input_ids = torch.full((len(rows), seq), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), seq), dtype=torch.bool)  # True = real token
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = True
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def __call__(self, queries: Sequence[str], passages: Sequence[str]) -> dict[str, torch.Tensor]:
        """Encode and pad: {"input_ids": LongTensor[b, s], "attention_mask": BoolTensor[b, s]}."""
        return self.pad(self.encode(queries, passages))
