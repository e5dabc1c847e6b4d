"""Tokenizers: the built-in tiny byte-level one, loading a model's own, and pair encoding for the reranker.

Pair encoding follows DESIGN.md §3: the pair is ONE string made by the template, tokenized without special
tokens, BOS prepended explicitly, no EOS, truncated on the right so BOS + tokens <= max_length, right-padded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from .errors import DataError
from .template import DEFAULT_TEMPLATE, format_pair

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
                 fixed_length: bool = False, template: str = DEFAULT_TEMPLATE):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if tokenizer.bos_token_id is None:
            raise ValueError("the tokenizer has no BOS token, but reranker inputs must start with BOS")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.fixed_length = fixed_length
        self.template = template
        self.bos_id = tokenizer.bos_token_id
        self.pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)

    def encode(self, queries: Sequence[str], passages: Sequence[str]) -> list[list[int]]:
        """Token ids per pair: BOS + tokens of the formatted string, cut on the right to max_length."""
        if len(queries) != len(passages):
            raise ValueError(f"got {len(queries)} queries but {len(passages)} passages")
        if not queries:
            return []
        texts = [format_pair(q, p, self.template) for q, p in zip(queries, passages)]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [[self.bos_id, *row[: self.max_length - 1]] for row in ids]

    def lengths(self, queries: Sequence[str], passages: Sequence[str]) -> list[int]:
        """Token count of each pair after truncation (BOS included), e.g. for length-sorted batching."""
        return [len(row) for row in self.encode(queries, passages)]

    def pad(self, rows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Right-pad id lists to one length: fixed, or the longest rounded up to pad_to_multiple_of."""
        if not rows:
            raise ValueError("cannot pad an empty batch")
        longest = self.max_length if self.fixed_length else max(len(r) for r in rows)
        seq = round_up(longest, self.pad_to_multiple_of)
        input_ids = torch.full((len(rows), seq), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), seq), dtype=torch.bool)  # True = real token
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = True
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def __call__(self, queries: Sequence[str], passages: Sequence[str]) -> dict[str, torch.Tensor]:
        """Encode and pad: {"input_ids": LongTensor[b, s], "attention_mask": BoolTensor[b, s]}."""
        return self.pad(self.encode(queries, passages))
