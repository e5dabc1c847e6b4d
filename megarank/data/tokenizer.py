"""Tokenizers: the built-in tiny byte-level one, loading a model's own, and pair encoding for the reranker.

Pair encoding follows docs/architecture.md: the pair is ONE string made by the template, tokenized without special
tokens, BOS prepended explicitly, no EOS, truncated on the right so BOS + tokens <= max_length, right-padded.
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

log = logging.getLogger(__name__)

# Warn when at least this share of the pairs seen (after at least _LOST_MIN_PAIRS) lost their whole passage.
_LOST_WARN_FRACTION = 0.25
_LOST_MIN_PAIRS = 16

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
                 template: str = DEFAULT_TEMPLATE):
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
        self._check_room()
        self.n_pairs = 0  # pairs encoded so far, and those of them cut before their passage's first token
        self.n_passage_lost = 0
        self._warned = False

    def _template_head(self, query: str = "") -> str:
        """The formatted text before the passage (template text and `query`), "" if it cannot be split."""
        head = self.template.split("{passage}", 1)[0]
        try:
            return head.format(query=query)
        except (KeyError, IndexError, ValueError):
            return ""

    def _check_room(self) -> None:
        """Reject a max_length that BOS and the template's own text fill before any passage token.

        Such sequences are all cut before the passage, so every passage of a group reads the same and the
        listwise loss stays at ln(n_passages) without a word; this is only knowable with the real tokenizer.
        """
        head = self._template_head()
        fixed = 1 + len(self.tokenizer(head, add_special_tokens=False)["input_ids"]) if head else 1
        if fixed >= self.max_length:
            raise DataError(
                f"data.max_length={self.max_length} is too short for data.template: BOS and the template's text "
                f"before {{passage}} ({head!r}) already take {fixed} tokens, so every passage would be cut off; "
                f"set data.max_length well above {fixed} (e.g. {max(2 * fixed, 128)}) or shorten the template")

    def encode(self, queries: Sequence[str], passages: Sequence[str]) -> list[list[int]]:
        """Token ids per pair: BOS + tokens of the formatted string, cut on the right to max_length."""
        if len(queries) != len(passages):
            raise ValueError(f"got {len(queries)} queries but {len(passages)} passages")
        if not queries:
            return []
        texts = [format_pair(q, p, self.template) for q, p in zip(queries, passages)]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        self._count_lost_passages(queries, passages, ids)
        return [[self.bos_id, *row[: self.max_length - 1]] for row in ids]

    def _count_lost_passages(self, queries: Sequence[str], passages: Sequence[str], ids: list[list[int]]) -> None:
        """Count pairs whose truncation leaves no passage token; warn once when that is a large share.

        Only truncated pairs are checked: their head (template text + query) is tokenized on its own, and the
        passage is lost when the head alone fills the budget.
        """
        keep = self.max_length - 1
        cut = [i for i, row in enumerate(ids) if len(row) > keep and passages[i]]
        if cut:
            heads = self.tokenizer([self._template_head(queries[i]) for i in cut], add_special_tokens=False)
            self.n_passage_lost += sum(len(h) >= keep for h in heads["input_ids"])
        self.n_pairs += len(ids)
        if (not self._warned and self.n_pairs >= _LOST_MIN_PAIRS
                and self.n_passage_lost >= _LOST_WARN_FRACTION * self.n_pairs):
            self._warned = True
            log.warning("%d of the first %d query-passage pairs are cut to data.max_length=%d before any passage "
                        "token (their query fills the sequence): the model cannot tell their passages apart; "
                        "raise data.max_length", self.n_passage_lost, self.n_pairs, self.max_length)

    def lengths(self, queries: Sequence[str], passages: Sequence[str]) -> list[int]:
        """Token count of each pair after truncation (BOS included), e.g. for length-sorted batching."""
        return [len(row) for row in self.encode(queries, passages)]

    def pad(self, rows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Right-pad id lists to the longest rounded up to pad_to_multiple_of (on every layout: pipeline
        stages exchange each batch's shape, see ``variable_seq_lengths`` in model/transformer_config.py)."""
        if not rows:
            raise ValueError("cannot pad an empty batch")
        seq = round_up(max(len(r) for r in rows), self.pad_to_multiple_of)
        input_ids = torch.full((len(rows), seq), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), seq), dtype=torch.bool)  # True = real token
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = True
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def __call__(self, queries: Sequence[str], passages: Sequence[str]) -> dict[str, torch.Tensor]:
        """Encode and pad: {"input_ids": LongTensor[b, s], "attention_mask": BoolTensor[b, s]}."""
        return self.pad(self.encode(queries, passages))
