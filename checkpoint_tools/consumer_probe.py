"""Run in any venv (no megarank import): load a megarank export the way each consumer does and print JSON.

    python checkpoint_tools/consumer_probe.py PAIRS.json EXPORT [EXPORT ...] > out.json

Output, per export: {"versions": {...}, "ids": {consumer: [[token ids] per pair]}, "scores": {consumer: [score per
pair]}, ...}.
Scores are raw logits (no sigmoid). Consumers: transformers (eager and sdpa, on the export tokenizer's text-pair
batch with right padding, and one pair at a time without an attention_mask), sentence-transformers' CrossEncoder
on plain pairs, and the input vLLM builds from the shipped score template (rendered and tokenized as vLLM's score
API does). Token ids: the chat template rendered to strings and tokenized with truncation (the whole string cut on
the right), the chat template tokenized in one call, text pairs.
"""
import json
import sys

import torch


def messages(q, p):
    return [{"role": "query", "content": q}, {"role": "document", "content": p}]


def probe(export, pairs):
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = {"versions": {"transformers": transformers.__version__}, "ids": {}, "scores": {}}
    tok = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
    texts = [tok.apply_chat_template(messages(q, p), tokenize=False) for q, p in pairs]
    rendered = tok(texts, add_special_tokens=False, padding=True, truncation=True, return_tensors="pt")
    out["ids"]["chat_template"] = [row[m.bool()].tolist() for row, m in zip(rendered["input_ids"], rendered["attention_mask"])]
    # the chat template tokenized in one call (as sentence-transformers >= 5.7 does): the export's tokenizer class
    # cuts it as megarank does
    one_call = tok.apply_chat_template([messages(q, p) for q, p in pairs], tokenize=True, truncation=True,
                                       padding=True, return_dict=True, return_tensors="pt")
    out["ids"]["chat_template_tokenized"] = [row[m.bool()].tolist() for row, m in zip(one_call["input_ids"], one_call["attention_mask"])]
    # the README's transformers snippet: text pairs, right-padded
    batch = tok([q for q, _ in pairs], [p for _, p in pairs], padding=True, truncation=True, return_tensors="pt")
    out["ids"]["text_pair_batch"] = [row[m.bool()].tolist() for row, m in zip(batch["input_ids"], batch["attention_mask"])]
    for attn in ("eager", "sdpa"):
        model = AutoModelForSequenceClassification.from_pretrained(export, trust_remote_code=True, attn_implementation=attn).eval()
        with torch.no_grad():
            out["scores"][f"transformers_{attn}"] = model(**batch).logits[:, 0].tolist()
            out["scores"][f"transformers_{attn}_no_mask"] = [
                model(input_ids=torch.tensor([ids])).logits[0, 0].item() for ids in out["ids"]["text_pair_batch"]]
    out["config_temperature"] = model.config.temperature
    # transformers 4.x PretrainedConfig.__init__ resets `temperature` when a config sets it too early
    from transformers import AutoConfig

    out["temperature_kwarg"] = AutoConfig.from_pretrained(export, trust_remote_code=True, temperature=2.0).temperature

    # vLLM's score API (vllm/entrypoints/pooling/score/utils.py get_score_prompt): apply_chat_template(
    # [query, document] messages, chat_template=<--chat-template file>, tokenize=False), then tokenizer(prompt) with
    # the tokenizer's own special tokens.
    template = open(f"{export}/vllm_score_template.jinja").read()
    rendered = [tok.apply_chat_template(messages(q, p), chat_template=template, tokenize=False) for q, p in pairs]
    out["ids"]["vllm_score_template"] = [tok(r)["input_ids"] for r in rendered]
    # a text pair given to the tokenizer (older sentence-transformers, vLLM without a score template): the export's
    # tokenizer class (trust_remote_code) formats it into megarank's string
    pair_batch = tok([q for q, _ in pairs], [p for _, p in pairs], truncation=True)
    out["ids"]["text_pair"] = pair_batch["input_ids"]
    out["ids"]["text_pair_list"] = tok([list(p) for p in pairs], truncation=True)["input_ids"]
    out["tokenizer_class"] = type(tok).__name__

    try:
        import sentence_transformers
        from sentence_transformers import CrossEncoder
    except ImportError:
        sentence_transformers = None
    if sentence_transformers is not None:
        out["versions"]["sentence_transformers"] = sentence_transformers.__version__
        ce = CrossEncoder(export, trust_remote_code=True, device="cpu")
        scores = ce.predict([tuple(p) for p in pairs], activation_fn=torch.nn.Identity(), convert_to_tensor=True)
        out["scores"]["cross_encoder"] = scores.float().reshape(-1).tolist()
    return out


if __name__ == "__main__":
    pairs = json.load(open(sys.argv[1]))
    json.dump({export: probe(export, pairs) for export in sys.argv[2:]}, sys.stdout)
