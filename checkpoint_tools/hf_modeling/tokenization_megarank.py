"""The tokenizer class of a megarank export (``trust_remote_code=True``): a (query, passage) pair becomes megarank's
input, cut as megarank cuts it.

megarank never gives a (query, passage) pair to a tokenizer as a pair: it reads ``bos_token + template.format(
query=..., passage=...)`` with no other special tokens (``megarank/data/tokenizer.py``), and a pair longer than
``data.max_length`` loses passage tokens first, then query tokens only down to ``data.max_query_length``, never the
template's text (``megarank/data/truncation.py``; docs/data.md#truncation). Tools that tokenize pairs —
sentence-transformers' CrossEncoder before 5.7 (``tokenizer(batch_of_pairs, padding=True, truncation=True)``),
vLLM's score API without a score template (``tokenizer(text=query, text_pair=document)``) — and tools that render
the chat template and tokenize it in one call (sentence-transformers >= 5.7: ``apply_chat_template(messages,
tokenize=True, truncation=True)``) would otherwise get the tokenizer's pair encoding, or the whole string cut on
the right. This subclass formats pairs itself, in ``__call__`` (text pairs) and in ``apply_chat_template`` (a
conversation of one "query" and one "document" message, tokenized with truncation); single texts, ``encode``, a
chat template rendered to a string (``tokenize=False``) and everything else behave exactly as
``PreTrainedTokenizerFast``. Without ``trust_remote_code`` transformers loads the plain ``PreTrainedTokenizerFast``
named in tokenizer_config.json.

``field_spans`` and ``cut_row`` are copies of megarank/data/truncation.py's (megarank is not installed where an
export is used); tests/test_truncation.py checks that both give the same ids.
"""
import inspect
import string

from transformers import PreTrainedTokenizerFast

DEFAULT_TEMPLATE = "question:{query} \n \n passage:{passage}"


def field_spans(template: str, query: str, passage: str):
    """(the formatted string, [(start, end)] of each {query}, [(start, end)] of each {passage}) in characters."""
    text, q_spans, p_spans = [], [], []
    pos = 0
    for literal, field, _, _ in string.Formatter().parse(template):
        text.append(literal)
        pos += len(literal)
        if field is None:
            continue
        value = {"query": query, "passage": passage}[field]
        (q_spans if field == "query" else p_spans).append((pos, pos + len(value)))
        text.append(value)
        pos += len(value)
    return "".join(text), q_spans, p_spans


def cut_row(ids, offsets, q_spans, p_spans, keep, max_query):
    """(kept ids, query cut?, passage cut?) for one row of ``ids`` (its character ``offsets``) within ``keep`` tokens.

    ``max_query``: tokens the query keeps however long the passage (the passage is cut first)."""
    if len(ids) <= keep:
        return list(ids), False, False

    def owner(start):
        if any(a <= start < b for a, b in q_spans):
            return "q"
        if any(a <= start < b for a, b in p_spans):
            return "p"
        return ""

    owners = [owner(o[0]) for o in offsets]
    nq, np_ = owners.count("q"), owners.count("p")
    room = keep - (len(ids) - nq - np_)
    q_keep = min(nq, max(max_query, room - np_))
    p_keep = max(0, min(np_, room - q_keep))
    out, seen = [], {"q": 0, "p": 0}
    for tok, who in zip(ids, owners):
        if who:
            seen[who] += 1
            if seen[who] > (q_keep if who == "q" else p_keep):
                continue
        out.append(tok)
    return out[:keep], q_keep < nq, p_keep < np_  # [:keep]: only when the template's own text is over budget


def _is_pair(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) == 2 and all(isinstance(s, str) for s in x)


def _truncates(truncation) -> bool:
    return bool(truncation) and truncation != "do_not_truncate"


def _text(content) -> str:
    """A message's text: a string, or the text parts of structured content (as sentence-transformers and vLLM send)."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")


def _pair_of(conversation):
    """(query, passage) of a [query message, document message] conversation (any order), else None."""
    if not isinstance(conversation, (list, tuple)) or len(conversation) != 2:
        return None
    found = {}
    for message in conversation:
        if not isinstance(message, dict) or message.get("role") not in ("query", "document"):
            return None
        found[message["role"]] = _text(message.get("content", ""))
    return (found["query"], found["document"]) if len(found) == 2 else None


class MegarankRerankerTokenizerFast(PreTrainedTokenizerFast):
    # No __init__ of its own: transformers 5 then loads tokenizer.json as it is (tokenization_utils_tokenizers.py
    # convert_to_native_format rebuilds the backend from vocab/merges for subclasses that define __init__, which
    # loses the byte-level pre-tokenizer). The template and the query budget come from tokenizer_config.json's
    # `megarank_template` and `megarank_max_query_length`, which both 4.x and 5.x keep in `init_kwargs`.

    @property
    def megarank_template(self) -> str:
        return self.init_kwargs.get("megarank_template") or DEFAULT_TEMPLATE

    def query_budget(self, max_length: int) -> int:
        """Tokens a query keeps however long its passage: ``megarank_max_query_length``, or (null, older exports)
        megarank's default, half of what BOS and the template's text leave of ``max_length``."""
        value = self.init_kwargs.get("megarank_max_query_length")
        if isinstance(value, int) and value > 0:
            return value
        empty = self.megarank_template.format(query="", passage="")
        fixed = 1 + len(super().__call__([empty], add_special_tokens=False)["input_ids"][0])
        return max((max_length - fixed) // 2, 1)

    def format_pair(self, query: str, passage: str) -> str:
        """BOS + the trained template: tokenized without special tokens this is megarank's input (before any cut)."""
        return (self.bos_token or "") + self.megarank_template.format(query=query, passage=passage)

    def encode_pairs(self, queries, passages, max_length=None) -> list:
        """megarank's token ids of each (query, passage): BOS + the template's tokens, cut to ``max_length``
        (default ``model_max_length`` = the checkpoint's data.max_length) as megarank cuts them."""
        max_length = max_length or self.model_max_length
        texts = [self.megarank_template.format(query=q, passage=p) for q, p in zip(queries, passages)]
        key = "sequence-length-is-longer-than-the-specified-maximum"  # the ids are cut below: no warning
        warned = self.deprecation_warnings.get(key, False)
        self.deprecation_warnings[key] = True
        try:
            enc = super().__call__(texts, add_special_tokens=False, return_offsets_mapping=True)
        finally:
            self.deprecation_warnings[key] = warned
        budget = self.query_budget(max_length)
        rows = []
        for q, p, ids, offsets in zip(queries, passages, enc["input_ids"], enc["offset_mapping"]):
            _, q_spans, p_spans = field_spans(self.megarank_template, q, p)
            rows.append([self.bos_token_id, *cut_row(ids, offsets, q_spans, p_spans, max_length - 1, budget)[0]])
        return rows

    def _batch(self, rows, single: bool, kwargs: dict, return_dict: bool = True):
        """``rows`` as __call__ / apply_chat_template return them (padding, tensors, attention mask)."""
        if not return_dict:
            out = rows[0] if single else rows
            if kwargs.get("return_tensors"):
                return self.pad({"input_ids": out}, padding=kwargs.get("padding", False),
                                return_tensors=kwargs["return_tensors"])["input_ids"]
            return out
        self.deprecation_warnings["Asking-to-pad-a-fast-tokenizer"] = True  # ids are padded here by design
        return self.pad({"input_ids": rows[0] if single else rows}, padding=kwargs.get("padding", False),
                        max_length=kwargs.get("max_length"), pad_to_multiple_of=kwargs.get("pad_to_multiple_of"),
                        return_attention_mask=kwargs.get("return_attention_mask"),
                        return_tensors=kwargs.get("return_tensors"))

    def __call__(self, text=None, text_pair=None, *args, **kwargs):
        pairs, single = None, False
        if text is not None and text_pair is not None:  # tokenizer(query(s), passage(s))
            single = isinstance(text, str)
            pairs = [(text, text_pair)] if single else list(zip(text, text_pair))
        elif (isinstance(text, (list, tuple)) and text and not kwargs.get("is_split_into_words")
              and all(_is_pair(x) for x in text)):  # tokenizer([(query, passage), ...]): a batch of pairs
            pairs = [tuple(x) for x in text]
        if pairs is None:
            return super().__call__(text, text_pair, *args, **kwargs)
        if not args and _truncates(kwargs.get("truncation")):  # megarank's cut, not the tokenizer's
            rows = self.encode_pairs([q for q, _ in pairs], [p for _, p in pairs], kwargs.get("max_length"))
            return self._batch(rows, single, kwargs)
        kwargs["add_special_tokens"] = False
        texts = [self.format_pair(q, p) for q, p in pairs]
        return super().__call__(texts[0] if single else texts, None, *args, **kwargs)

    def apply_chat_template(self, conversation, *args, **kwargs):
        """A [query, document] conversation (or a batch of them) tokenized with truncation: megarank's ids, cut as
        megarank cuts them (the rendered string would be cut on the right). Anything else: transformers' own."""
        single = bool(conversation) and isinstance(conversation[0], dict)
        pairs = [_pair_of(c) for c in ([conversation] if single else conversation)] if conversation else []
        template = kwargs.get("chat_template")
        if (args or not pairs or any(p is None for p in pairs) or not kwargs.get("tokenize", True)
                or not _truncates(kwargs.get("truncation")) or kwargs.get("tools") or kwargs.get("documents")
                or kwargs.get("add_generation_prompt") or kwargs.get("continue_final_message")
                or kwargs.get("return_assistant_tokens_mask") or (template is not None and template != self.chat_template)):
            return super().apply_chat_template(conversation, *args, **kwargs)
        rows = self.encode_pairs([q for q, _ in pairs], [p for _, p in pairs], kwargs.get("max_length"))
        return_dict = kwargs.get("return_dict", _RETURN_DICT_DEFAULT)
        return self._batch(rows, single, {**(kwargs.get("tokenizer_kwargs") or {}), **kwargs}, return_dict)


# transformers 4.x returns token ids from apply_chat_template by default, 5.x a BatchEncoding
_RETURN_DICT_DEFAULT = inspect.signature(PreTrainedTokenizerFast.apply_chat_template).parameters["return_dict"].default
