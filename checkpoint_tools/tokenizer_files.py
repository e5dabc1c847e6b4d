"""Find and copy a model's tokenizer files (they travel with a conversion in both directions)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "tiktoken.model",
    "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "tokenization_megarank.py",  # a megarank export's tokenizer class (its tokenizer_config.json auto_map names it)
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


# Written next to the tokenizer of an export. vLLM's score/rerank API renders it with the (query, document) messages
# and then tokenizes the result like any prompt, adding the tokenizer's own special tokens.
VLLM_SCORE_TEMPLATE = "vllm_score_template.jinja"
# hf_modeling/tokenization_megarank.py, shipped beside the weights
TOKENIZER_CLASS = "tokenization_megarank.MegarankRerankerTokenizerFast"
# Classes transformers 5 writes that 4.x does not know, and the 4.x name of the same tokenizer.
PORTABLE_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}

_MESSAGES = (
    '{%- set ns = namespace(query="", passage="") -%}'
    "{%- for message in messages -%}"
    '{%- if message["content"] is string -%}{%- set text = message["content"] -%}'
    '{%- else -%}{%- set text = message["content"] | selectattr("type", "equalto", "text") | map(attribute="text") | join("") -%}'
    "{%- endif -%}"
    '{%- if message["role"] == "query" -%}{%- set ns.query = text -%}'
    '{%- elif message["role"] == "document" -%}{%- set ns.passage = text -%}{%- endif -%}'
    "{%- endfor -%}"
)


def reranker_chat_template(template: str, with_bos: bool) -> str:
    """A Jinja chat template that renders [{role: query}, {role: document}] messages (string or structured content,
    as sentence-transformers and vLLM send them) into megarank's single input string ``template``, optionally
    preceded by ``bos_token``. Literal text is emitted as escaped Jinja strings, so no template text can be taken
    for Jinja syntax."""
    import json
    import string

    parts = [_MESSAGES, "{{- bos_token -}}" if with_bos else ""]
    for literal, field, _, _ in string.Formatter().parse(template):
        if literal:
            parts.append("{{- " + json.dumps(literal) + " -}}")
        if field is not None:
            if field not in ("query", "passage"):
                raise ValueError(f"data.template field {{{field}}} is not {{query}} or {{passage}}")
            parts.append("{{- ns." + field + " -}}")
    return "".join(parts)


def _adds_bos(folder, template: str, max_length: int, max_query_length) -> tuple:
    """(bos_token_id, whether tokenizing text with the tokenizer's defaults puts BOS first, the query budget) for
    the files in folder; the budget is data.max_query_length or megarank's default for null (PairTokenizer: half
    of what BOS and the template's text leave of max_length)."""
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:  # tokenizer files only: AutoTokenizer must not read a config.json
        copy_tokenizer(folder, tmp)
        tok = AutoTokenizer.from_pretrained(tmp)
    if max_query_length is None:
        fixed = 1 + len(tok(template.format(query="", passage=""), add_special_tokens=False)["input_ids"])
        max_query_length = max((max_length - fixed) // 2, 1)
    if tok.bos_token_id is None:
        return None, False, max_query_length
    return tok.bos_token_id, tok("a")["input_ids"][:1] == [tok.bos_token_id], max_query_length


def prepare_reranker_tokenizer(folder, template: str, max_length: int, max_query_length=None) -> str:
    """Make an export's tokenizer produce megarank's input everywhere; returns a note for the summary line.

    * ``tokenizer_class`` names a class transformers 4.x knows (5.x writes ``TokenizersBackend``).
    * ``chat_template`` (in tokenizer_config.json, read by 4.x and 5.x) = BOS + the trained template: what
      sentence-transformers' CrossEncoder renders for (query, passage) pairs. transformers tokenizes a rendered
      chat template without adding special tokens, so the BOS comes from the template for every tokenizer.
      A chat template inherited from the base LM is removed (chat_template.jinja/.json): it describes a chat model.
    * ``vllm_score_template.jinja`` = the trained template, with BOS only when the tokenizer does not add one itself
      (Llama 3 adds BOS; SmolLM2 and megarank's tiny tokenizer do not): exactly one BOS in vLLM's input.
    * ``model_max_length`` = data.max_length: where consumers cut (megarank's cut when the export's tokenizer class
      does it, below; the whole string on the right otherwise).
    * ``megarank_max_query_length`` = data.max_query_length (null resolved to megarank's default for this
      tokenizer): the query budget of megarank's cut (docs/data.md#truncation).
    * ``auto_map`` to ``tokenization_megarank.py`` (fast tokenizers only): with ``trust_remote_code`` a text pair
      given to the tokenizer, or a [query, document] conversation tokenized by ``apply_chat_template`` with
      truncation, becomes megarank's ids, cut as megarank cuts them (sentence-transformers, vLLM without a
      template, the README's transformers snippet).
    """
    import json

    folder = Path(folder)
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return "no tokenizer_config.json: no chat/score template written"
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)
    cfg = json.loads(path.read_text())
    cfg.pop("chat_template", None)
    cls = cfg.get("tokenizer_class")
    if cls in PORTABLE_CLASSES or (cls is None and (folder / "tokenizer.json").is_file()):
        # without a class, transformers 4.x AutoTokenizer reads config.json, which needs trust_remote_code
        cfg["tokenizer_class"] = PORTABLE_CLASSES.get(cls, "PreTrainedTokenizerFast")
    cfg["model_max_length"] = max_length
    if (folder / "tokenizer.json").is_file():  # the subclass is a PreTrainedTokenizerFast over tokenizer.json
        # with trust_remote_code, the shipped subclass turns text pairs into megarank's string (older
        # sentence-transformers, vLLM without a score template); without it, tokenizer_class above is used
        cfg["auto_map"] = {"AutoTokenizer": [None, TOKENIZER_CLASS]}
        cfg["megarank_template"] = template
    bos_id, adds_bos, query_budget = _adds_bos(folder, template, max_length, max_query_length)
    if "megarank_template" in cfg:
        cfg["megarank_max_query_length"] = query_budget
    note = "tokenizer has no BOS token: no chat/score template written"
    if bos_id is not None:
        cfg["chat_template"] = reranker_chat_template(template, with_bos=True)
        (folder / VLLM_SCORE_TEMPLATE).write_text(reranker_chat_template(template, with_bos=not adds_bos))
        note = f"chat template and {VLLM_SCORE_TEMPLATE} written (tokenizer {'adds' if adds_bos else 'does not add'} BOS itself)"
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    return note
