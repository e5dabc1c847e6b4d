"""Find and copy a model's tokenizer files (they travel with a conversion in both directions)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "tiktoken.model",
    "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


def tokenizer_files(folder) -> list:
    folder = Path(folder)
    return [folder / f for f in TOKENIZER_FILES if (folder / f).is_file()]


def copy_tokenizer(src_folder, dst_folder) -> list:
    """Copy the tokenizer files present in src_folder; returns their names (empty when there are none)."""
    files = tokenizer_files(src_folder)
    if files:
        Path(dst_folder).mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, Path(dst_folder) / f.name)
    return [f.name for f in files]


def ensure_pad_token(folder) -> str | None:
    """Rerankers batch with right padding: if tokenizer_config.json names no pad token, use the EOS token.

    Returns a note for the summary when it changed something (Llama 3's tokenizer ships without a pad token)."""
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    if cfg.get("pad_token") is not None or cfg.get("eos_token") is None:
        return None
    cfg["pad_token"] = cfg["eos_token"]
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    eos = cfg["eos_token"]["content"] if isinstance(cfg["eos_token"], dict) else cfg["eos_token"]
    return f"tokenizer had no pad token; set pad_token = eos_token ({eos}) in tokenizer_config.json"
