"""The tokenizer class of a megarank export (``trust_remote_code=True``): a text *pair* becomes megarank's one string.

megarank never gives a (query, passage) pair to a tokenizer as a pair: it reads ``bos_token + template.format(
query=..., passage=...)`` with no other special tokens (``megarank/data/tokenizer.py``). Tools that tokenize pairs
— sentence-transformers' CrossEncoder before 5.7 (``tokenizer(batch_of_pairs, padding=True, truncation=True)``),
vLLM's score API without a score template (``tokenizer(text=query, text_pair=document)``) — would otherwise get the
tokenizer's pair encoding. This subclass formats pairs first, in ``__call__`` only (the entry point those tools
use); single texts, ``encode`` and everything else behave exactly as ``PreTrainedTokenizerFast``. Without
``trust_remote_code`` transformers loads the plain ``PreTrainedTokenizerFast`` named in tokenizer_config.json.
"""
from transformers import PreTrainedTokenizerFast

DEFAULT_TEMPLATE = "question:{query} \n \n passage:{passage}"


def _is_pair(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) == 2 and all(isinstance(s, str) for s in x)


class MegarankRerankerTokenizerFast(PreTrainedTokenizerFast):
    # No __init__ of its own: transformers 5 then loads tokenizer.json as it is (tokenization_utils_tokenizers.py
    # convert_to_native_format rebuilds the backend from vocab/merges for subclasses that define __init__, which
    # loses the byte-level pre-tokenizer). The template comes from tokenizer_config.json's `megarank_template`,
    # which both 4.x and 5.x keep in `init_kwargs`.

    @property
    def megarank_template(self) -> str:
        return self.init_kwargs.get("megarank_template") or DEFAULT_TEMPLATE

    def format_pair(self, query: str, passage: str) -> str:
        """BOS + the trained template: tokenized without special tokens this is megarank's input."""
        return (self.bos_token or "") + self.megarank_template.format(query=query, passage=passage)

    def __call__(self, text=None, text_pair=None, *args, **kwargs):
        if text is not None and text_pair is not None:  # tokenizer(query(s), passage(s))
            if isinstance(text, str):
                text = self.format_pair(text, text_pair)
            else:
                text = [self.format_pair(q, p) for q, p in zip(text, text_pair)]
            text_pair = None
            kwargs["add_special_tokens"] = False
        elif (isinstance(text, (list, tuple)) and text and not kwargs.get("is_split_into_words")
              and all(_is_pair(x) for x in text)):  # tokenizer([(query, passage), ...]): a batch of pairs
            text = [self.format_pair(q, p) for q, p in text]
            kwargs["add_special_tokens"] = False
        return super().__call__(text, text_pair, *args, **kwargs)
