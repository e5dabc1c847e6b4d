"""A megarank export scores exactly (<= 1e-5, fp32) in every consumer, and the README's snippets are what runs.

Exports: a tiny GQA llama_bidirec with temperature 2.0 converted HF -> megarank -> HF, once with a tokenizer that
adds no special tokens (SmolLM2 style) and once with one whose post-processor puts BOS first (Llama 3 style).
Reference: megarank's own encoding (``PairTokenizer``: BOS + template, no EOS) and scores at TP=1.

Consumers, each in the main venv (transformers 5.x, sentence-transformers 6.x), in ``.venv-tf447``
(transformers 4.47.1, sentence-transformers 5.7.0), with transformers 4.57.6 overlaid on it, and with
sentence-transformers 4.1.0 (which tokenizes text pairs) overlaid on it (built by .ci/run; skipped with the reason
when absent), driven by
``checkpoint_tools/consumer_probe.py`` in a subprocess: AutoModelForSequenceClassification (eager, sdpa, with and
without an attention_mask) on the chat-template input; CrossEncoder.predict on plain pairs; the token ids vLLM's
score API builds from ``vllm_score_template.jinja`` (vLLM itself needs CUDA: only its prompt path runs here).
Then NeMo AutoModel's own class (both directions), the MTEB helper, and every Python block of the README section
"Use the exported reranker" run as written with ``path`` set to the export.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint_tools.cli import main
from tests.helpers_hf import edit_config, make_hf_llama, megarank_scores_tp1, read_safetensors_folder

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "checkpoint_tools" / "consumer_probe.py"
TOL = 1e-5
PAIRS = [("what is x?", "x is the 24th letter of the alphabet"), ("hello", "world"),
         ("a b c", "d e f g h i j k l m n o p"), ("é ü?", "naïve café \n with lines"),
         ("long?", "a passage longer than max_length (512): every consumer must cut it on the right " * 8),
         # longer than data.max_query_length (244 here): megarank cuts the query, never the whole passage
         ("a query much longer than data.max_query_length, cut before it can push the passage out " * 8,
          "the passage megarank still reads"),
         ("a long query and " * 40, "a long passage, both cut: the query down to its budget " * 20)]
LONG_QUERY = (5, 6)  # PAIRS whose query megarank cuts (docs/data.md#truncation)
# the ids that read megarank's cut: the export's tokenizer class on text pairs and on the chat template tokenized in
# one call; "chat_template" is the template rendered to strings, then tokenized: the whole string cut on the right
EXACT_IDS = ("chat_template_tokenized", "text_pair", "text_pair_list", "text_pair_batch")
STYLES = ("no_bos", "adds_bos", "lora")  # SmolLM2-like / Llama-3-like tokenizers; LoRA adapters on the latter, merged
# name -> (python, a folder to put first on PYTHONPATH): transformers 5.x (this venv), 4.47.1, and 4.57.6 as an
# overlay on the 4.47 venv (same sentence-transformers 5.7.0); .ci/run builds both
TF447 = ROOT / ".venv-tf447"
VENVS = {"main": (Path(sys.executable), None), "tf447": (TF447 / "bin" / "python", None),
         "tf457": (TF447 / "bin" / "python", TF447 / "overlay-tf457"),
         "st41": (TF447 / "bin" / "python", TF447 / "overlay-st41")}  # sentence-transformers 4.1.0: text pairs
README_PLACEHOLDER = '"runs/l1b-hf"'


def python_of(venv: str) -> Path:
    py, overlay = VENVS[venv]
    if not py.exists():
        pytest.skip(f"{py} is missing: .ci/run builds it (python3 -m venv .venv-tf447 && pip install torch==2.13.0 "
                    "transformers==4.47.1 sentence-transformers==5.7.0)")
    if overlay is not None and not overlay.is_dir():
        pytest.skip(f"{overlay} is missing: .ci/run builds it (pip install --no-deps --target ...; see .ci/run)")
    return py


def offline_env(venv: str = "main") -> dict:
    overlay = VENVS[venv][1]
    path = [str(overlay)] if overlay is not None else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(path + [str(ROOT)]),
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONSTARTUP", None)
    return env


@pytest.fixture(scope="module", autouse=True)
def offline():
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({k: "1" for k in saved})
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("consumers")
    out = {}
    for style in STYLES[:2]:
        src = make_hf_llama(root / style / "hf", "llama_bidirec", seed=21, temperature=2.0, adds_bos=style == "adds_bos")
        mg, hf = root / style / "mg", root / style / "export"
        assert main(["hf-to-megatron", str(src), str(mg), "--make-vocab-size-divisible-by", "64", "--quiet"]) == 0
        assert main(["megatron-to-hf", str(mg), str(hf), "--quiet"]) == 0
        out[style] = (src, mg, hf)
    out["lora"] = lora_export(out["adds_bos"][1], root / "lora")
    return out


def lora_export(base, work):
    """(None, the LoRA step, its merged export): 2 steps of `megarank train` with model.lora_rank=4 on ``base``
    (a large lr, so the adapters move), then megatron-to-hf (megarank/model/adapters.py, checkpoint_tools/lora_reader.py)."""
    train = [sys.executable, "-m", "megarank", "train", str(base / "config.yaml"), "model.lora_rank=4",
             "model.lora_alpha=8", f"checkpoint.load={base}", f"checkpoint.dir={work / 'run'}", "train.steps=2",
             "train.lr=0.01", "train.lr_warmup_steps=0", "train.global_batch_size=2", "train.micro_batch_size=2"]
    proc = subprocess.run(train, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=work.parent,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    step = work / "run" / "step-2"
    assert main(["megatron-to-hf", str(step), str(work / "export"), "--quiet"]) == 0
    return None, step, work / "export"


def reference(mg, pairs):
    """megarank's token ids (per pair) and scores for pairs."""
    from megarank.checkpoint import load_checkpoint_config
    from megarank.data.tokenizer import PairTokenizer, load_tokenizer

    cfg = load_checkpoint_config(mg)
    enc = PairTokenizer(load_tokenizer(Path(mg) / "tokenizer"), max_length=cfg.data.max_length, template=cfg.data.template,
                        max_query_length=cfg.data.max_query_length)
    rows = enc.encode([q for q, _ in pairs], [p for _, p in pairs])
    batch = enc.pad(rows)
    return rows, megarank_scores_tp1(mg, batch["input_ids"], batch["attention_mask"])


def uncut(mg, pairs):
    """megarank's token ids of pairs before any cut (BOS + the whole templated string)."""
    from megarank.checkpoint import load_checkpoint_config
    from megarank.data.tokenizer import PairTokenizer, load_tokenizer

    cfg = load_checkpoint_config(mg)
    enc = PairTokenizer(load_tokenizer(Path(mg) / "tokenizer"), max_length=1 << 20, template=cfg.data.template)
    return enc.encode([q for q, _ in pairs], [p for _, p in pairs])


def run(py, args, venv: str = "main", timeout=180) -> str:
    proc = subprocess.run([str(py), *map(str, args)], capture_output=True, text=True, env=offline_env(venv), cwd=ROOT,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def probes(exports, tmp_path_factory):
    """venv -> style -> the probe's output (one subprocess per venv for both exports)."""
    pairs_file = tmp_path_factory.mktemp("probe") / "pairs.json"
    pairs_file.write_text(json.dumps(PAIRS))
    cache = {}

    def get(venv):
        if venv not in cache:
            if venv == "main":  # this interpreter has the main venv's packages loaded already
                from checkpoint_tools.consumer_probe import probe

                cache[venv] = {s: probe(str(exports[s][2]), PAIRS) for s in STYLES}
            else:
                out = json.loads(run(python_of(venv), [PROBE, pairs_file, *(exports[s][2] for s in STYLES)], venv))
                cache[venv] = {s: out[str(exports[s][2])] for s in STYLES}
        return cache[venv]

    return get


@pytest.mark.parametrize("venv", list(VENVS))
@pytest.mark.parametrize("style", STYLES)
def test_every_consumer_scores_like_megarank(exports, probes, style, venv):
    probe = probes(venv)[style]
    _, mg, _ = exports[style]
    ids, ours = reference(mg, PAIRS)
    bos = ids[0][0]
    assert all(row[0] == bos and row.count(bos) == 1 for row in ids)  # the reference itself has exactly one BOS
    assert set(probe["ids"]) == {"chat_template", "vllm_score_template", *EXACT_IDS}
    assert probe["tokenizer_class"] == "MegarankRerankerTokenizerFast"
    for name in EXACT_IDS:
        assert probe["ids"][name] == ids, (name, probe["versions"])
    # a string cut on the right is megarank's input but for a query over data.max_query_length
    right_cut = [row[:512] for row in uncut(mg, PAIRS)]
    assert probe["ids"]["chat_template"] == right_cut, probe["versions"]
    assert all((right_cut[i] == ids[i]) == (i not in LONG_QUERY) for i in range(len(PAIRS)))
    # vLLM does not cut at data.max_length by itself (README): its ids are the uncut string, equal to megarank's for
    # every pair that fits
    vllm = probe["ids"]["vllm_score_template"]
    assert vllm == uncut(mg, PAIRS), probe["versions"]
    assert [i for i in range(len(PAIRS)) if vllm[i] != ids[i]] == [4, *LONG_QUERY], probe["versions"]
    assert {"transformers_eager", "transformers_sdpa", "transformers_eager_no_mask", "transformers_sdpa_no_mask",
            "cross_encoder"} <= set(probe["scores"]), probe["versions"]
    for name, got in probe["scores"].items():
        diff = (torch.tensor(got) - ours).abs().max().item()
        assert diff <= TOL, (name, diff, probe["versions"])
    want = {"main": ("5.", "6."), "tf447": ("4.47.1", "5.7.0"), "tf457": ("4.57.6", "5.7.0"), "st41": ("4.47.1", "4.1.0")}[venv]
    got = (probe["versions"]["transformers"], probe["versions"]["sentence_transformers"])
    assert all(g.startswith(w) for g, w in zip(got, want)), probe["versions"]
    assert probe["config_temperature"] == 1.0  # folded into the head
    assert probe["temperature_kwarg"] == 2.0  # transformers 4.x no longer resets it
    assert ours.std() > 0
    assert len(ids[4]) == 512  # the long pair was cut at data.max_length
    assert [len(ids[i]) for i in LONG_QUERY] == [512, 512]


def test_export_config_and_tokenizer_files(exports):
    _, _, export = exports["adds_bos"]
    cfg = json.loads((export / "config.json").read_text())
    assert cfg["model_type"] == "llama_bidirec" and cfg["architectures"] == ["LlamaBidirectionalForSequenceClassification"]
    assert (cfg["temperature"], cfg["megarank_folded_temperature"], cfg["is_causal"], cfg["num_labels"]) == (1.0, 2.0, False, 1)
    assert set(cfg["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForSequenceClassification"}
    assert set(read_safetensors_folder(export)) >= {"score.weight", "model.embed_tokens.weight", "model.norm.weight"}
    tok_cfg = json.loads((export / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and tok_cfg["model_max_length"] == 512
    assert tok_cfg["megarank_max_query_length"] == (512 - 1 - 22) // 2  # null: half of what BOS + template leave
    # the BOS rule: the chat template (tokenized without special tokens) always has it, vLLM's only when needed
    assert "bos_token" in tok_cfg["chat_template"]
    assert "bos_token" not in (export / "vllm_score_template.jinja").read_text()
    assert "bos_token" in (exports["no_bos"][2] / "vllm_score_template.jinja").read_text()


def test_folded_temperature_round_trip_keeps_scores(exports, tmp_path):
    from megarank.checkpoint import load_checkpoint_config

    _, mg, export = exports["no_bos"]
    assert main(["hf-to-megatron", str(export), str(tmp_path / "mg2"), "--make-vocab-size-divisible-by", "64", "--quiet"]) == 0
    assert load_checkpoint_config(tmp_path / "mg2").model.temperature == 2.0
    ids, ours = reference(mg, PAIRS)
    _, again = reference(tmp_path / "mg2", PAIRS)
    assert (again - ours).abs().max().item() <= TOL
    assert main(["megatron-to-hf", str(tmp_path / "mg2"), str(tmp_path / "out2"), "--quiet"]) == 0
    a, b = read_safetensors_folder(export), read_safetensors_folder(tmp_path / "out2")
    assert all(torch.equal(a[k], b[k]) for k in a)  # T = 2: folding and unfolding are exact


def test_mteb_helper_predicts_megarank_scores(exports):
    from checkpoint_tools.mteb_model import MegarankReranker

    _, mg, export = exports["adds_bos"]
    model = MegarankReranker(str(export), device="cpu", batch_size=3)
    # mteb hands two dataloaders batched alike, each batch a dict with a "text" column
    queries = [{"text": [q for q, _ in PAIRS[:3]]}, {"text": [q for q, _ in PAIRS[3:]]}]
    docs = [{"text": [p for _, p in PAIRS[:3]]}, {"text": [p for _, p in PAIRS[3:]]}]
    got = model.predict(queries, docs, task_metadata=None, hf_split="test", hf_subset="default")
    _, ours = reference(mg, PAIRS)
    assert got.shape == (len(PAIRS),) and (torch.tensor(got) - ours).abs().max().item() <= TOL


# ------------------------------------------------------------------------------------------------- NeMo AutoModel


def nemo_classes():
    try:
        from nemo_automodel.components.models.llama_bidirectional.model import (
            LlamaBidirectionalConfig,
            LlamaBidirectionalForSequenceClassification,
        )
    except ImportError as e:
        pytest.skip(f"nemo_automodel's llama_bidirectional module is not importable ({e}); "
                    "pip install --no-deps nemo-automodel==0.7.0")
    return LlamaBidirectionalConfig, LlamaBidirectionalForSequenceClassification


def test_nemo_scores_a_megarank_export(exports):
    _, cls = nemo_classes()
    _, mg, export = exports["no_bos"]
    ids, ours = reference(mg, PAIRS)
    model = cls.from_pretrained(str(export)).eval()
    width = max(map(len, ids))
    input_ids = torch.tensor([r + [258] * (width - len(r)) for r in ids])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids])
    with torch.no_grad():
        theirs = model(input_ids=input_ids, attention_mask=mask).logits[:, 0]
    assert (theirs - ours).abs().max().item() <= TOL


def save_like_save_pretrained(model, folder: Path) -> None:
    """model.save_pretrained(folder), or the same two files when this transformers refuses NeMo's config.

    transformers >= 5.19 counts NeMo 0.7's `temperature` (a plain attribute of its config) as a generation setting
    and raises in save_pretrained (configuration_utils.py `_get_generation_parameters`); NeMo 0.7 pins 5.18. The
    fallback writes what save_pretrained writes: config.json (with `architectures`) and model.safetensors."""
    try:
        model.save_pretrained(str(folder))
        return
    except ValueError as e:
        if "generation parameters" not in str(e):
            raise
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.to_json_file(str(folder / "config.json"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_nemo_saved_model_imports_and_reexports(tmp_path, temperature):
    from tests.helpers_hf import TINY, _randomize, build_tokenizer

    config_cls, cls = nemo_classes()
    torch.manual_seed(0)
    model = cls(config_cls(num_labels=1, pooling="avg", temperature=temperature, **TINY))
    _randomize(model, 31)
    save_like_save_pretrained(model, tmp_path / "nemo")
    build_tokenizer(tmp_path / "nemo")
    assert main(["hf-to-megatron", str(tmp_path / "nemo"), str(tmp_path / "mg"), "--make-vocab-size-divisible-by", "64", "--quiet"]) == 0
    assert main(["megatron-to-hf", str(tmp_path / "mg"), str(tmp_path / "out"), "--quiet"]) == 0
    a, b = read_safetensors_folder(tmp_path / "nemo"), read_safetensors_folder(tmp_path / "out")
    assert set(a) == set(b)
    for k in a:
        want = a[k] / temperature if k == "score.weight" else a[k]  # the export folds T into the head
        assert torch.equal(b[k], want), k
    ids, ours = reference(tmp_path / "mg", PAIRS)
    width = max(map(len, ids))
    input_ids = torch.tensor([r + [258] * (width - len(r)) for r in ids])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids])
    with torch.no_grad():
        theirs = model.eval()(input_ids=input_ids, attention_mask=mask).logits[:, 0]
    assert (theirs - ours).abs().max().item() <= TOL


# ------------------------------------------------------------------------------------------------- import rules


def test_causal_bidirec_config_needs_allow_causal(tmp_path, capsys):
    src = make_hf_llama(tmp_path / "hf", "llama_bidirec", seed=2)
    edit_config(src, is_causal=True)
    capsys.readouterr()
    assert main(["hf-to-megatron", str(src), str(tmp_path / "mg"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is_causal: true" in err and "--allow-causal" in err
    assert not (tmp_path / "mg").exists()
    assert main(["hf-to-megatron", str(src), str(tmp_path / "mg"), "--quiet", "--allow-causal"]) == 0


def test_import_warns_about_defaults_and_reused_seq_cls_head(tmp_path, capsys):
    src = make_hf_llama(tmp_path / "hf", "seq_cls", seed=2)
    cfg = json.loads((src / "config.json").read_text())
    for key in ("rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling"):
        cfg.pop(key, None)
    (src / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["hf-to-megatron", str(src), str(tmp_path / "mg"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "no rms_norm_eps; using transformers' default rms_norm_eps = 1e-06" in err
    assert "no rope_theta; using transformers' default rope_theta = 10000.0" in err
    assert "last-token pooling" in err and "--pooling last" in err
    assert main(["hf-to-megatron", str(src), str(tmp_path / "mg2"), "--quiet", "--pooling", "last"]) == 0
    assert "last-token pooling" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- README snippets


def readme_blocks() -> list:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Use the exported reranker"):]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_section_has_a_snippet_per_consumer():
    blocks = readme_blocks()
    joined = "\n".join(blocks)
    for needle in ("AutoModelForSequenceClassification", "CrossEncoder", "MegarankReranker", "nemo_automodel", "mteb.evaluate"):
        assert needle in joined, needle
    runnable = [b for b in blocks if not b.startswith("# not run by the tests")]
    assert all(README_PLACEHOLDER in b and "scores =" in b for b in runnable)
    text = (ROOT / "README.md").read_text()
    assert "vllm serve" in text and "vllm_score_template.jinja" in text


SNIPPET_RUNNER = """
import importlib.util, json, sys
results = []
for i, code in enumerate(json.load(open(sys.argv[1]))):
    imports = [line.split()[1].split(".")[0] for line in code.splitlines() if line.startswith(("import ", "from "))]
    missing = [m for m in imports if importlib.util.find_spec(m) is None]
    if missing:  # e.g. nemo_automodel needs transformers 5 and is only in the main venv
        results.append({"block": i, "missing": missing})
        continue
    ns = {"__name__": "__main__"}
    exec(compile(code, f"README block {i}", "exec"), ns)
    results.append({"block": i, "pairs": [list(p) for p in ns["pairs"]], "scores": [float(s) for s in ns["scores"]]})
print("RESULT", json.dumps(results))
"""


@pytest.mark.parametrize("venv", list(VENVS))
def test_readme_snippets_run_as_written(exports, tmp_path, venv):
    """Every runnable README block, exactly as written but for `path`, in one interpreter per venv."""
    py = python_of(venv)
    _, mg, export = exports["adds_bos"]
    blocks = [b for b in readme_blocks() if not b.startswith("# not run by the tests")]
    (tmp_path / "blocks.json").write_text(json.dumps([b.replace(README_PLACEHOLDER, repr(str(export))) for b in blocks]))
    (tmp_path / "runner.py").write_text(SNIPPET_RUNNER)
    results = json.loads(run(py, [tmp_path / "runner.py", tmp_path / "blocks.json"], venv).split("RESULT ", 1)[1])
    ran = [r for r in results if "scores" in r]
    for r in ran:
        _, ours = reference(mg, [tuple(p) for p in r["pairs"]])
        diff = (torch.tensor(r["scores"]) - ours).abs().max().item()
        assert diff <= TOL, (blocks[r["block"]][:120], diff)
    skipped = [blocks[r["block"]].splitlines()[1] for r in results if "missing" in r]
    # main venv: all four (transformers, CrossEncoder, MTEB helper, NeMo); the 4.x venvs lack only NeMo
    assert len(ran) == (len(blocks) if venv == "main" else len(blocks) - 1), skipped


def test_chat_template_reproduces_any_data_template(tmp_path):
    """Template text that looks like Jinja, quotes, backslashes and non-ASCII are emitted literally."""
    from checkpoint_tools.tokenizer_files import reranker_chat_template
    from megarank.data.template import format_pair
    from megarank.data.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer(tmp_path / "tokenizer")
    template = 'Q{{%}} "{query}" \\ {{# not a comment #}} «doc»:\n{passage} {{{{ end }}}}'
    for with_bos in (True, False):
        jinja = reranker_chat_template(template, with_bos)
        for content in ("plain", "structured"):
            def msg(role, text):
                return {"role": role, "content": text if content == "plain" else [{"type": "text", "text": text}]}
            got = tok.apply_chat_template([msg("query", "a {b} %}"), msg("document", "c\n{{d}}")], chat_template=jinja,
                                          tokenize=False)
            want = (tok.bos_token if with_bos else "") + format_pair("a {b} %}", "c\n{{d}}", template)
            assert got == want, (content, got, want)


def test_the_lora_export_is_its_trained_adapters_not_the_base(exports):
    """The "lora" export's scores (compared with every consumer above) are the trained adapters', not its base's."""
    _, adapted = reference(exports["lora"][1], PAIRS)
    _, base = reference(exports["adds_bos"][1], PAIRS)
    assert (adapted - base).abs().max().item() > 1e-3
