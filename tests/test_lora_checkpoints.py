"""LoRA checkpoints with real `megarank train` runs (torchrun, DP=2, gloo, the distributed optimizer) on a random
tiny base saved as a converted checkpoint:

- a step folder holds the adapters, the score head and their optimizer state only, plus the base's record;
- SIGKILL after step N, resume to 2N: the same per-step losses and bit-identical adapters, head and optimizer state
  as 2N steps straight;
- resuming with another base (``checkpoint.load``), or after the base's weights changed, is a one-line error
  naming both;
- `Reranker.from_checkpoint` scores the LoRA step directly, `megarank-convert megatron-to-hf` writes the merged
  model, and the export under transformers scores the same (<= 1e-5, fp32), unlike the base.
"""
from __future__ import annotations

import json
import shutil
import sys
import warnings

import pytest

import torch

from checkpoint_tools.cli import main as convert
from tests.dist_utils import run_distributed
from tests.test_resume import N, RESUME, _assert_same_run, _complete, _latest, _sigkill_at
from tests.training_harness import TINY, log_lines, make_init_checkpoint, read_plain_tensors, run, tb_scalars, train_cmd

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
LORA = ["model.lora_rank=4", "model.lora_alpha=8", "train.lr=0.01", "parallel.use_distributed_optimizer=true"]
TOL = 1e-5
PAIRS = [("what is x?", "x is the 24th letter of the alphabet"), ("hello", "world"), ("a b c", "d e f g h i j k")]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_init_checkpoint(tmp_path_factory.mktemp("lora_base"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, base):
    work = tmp_path_factory.mktemp("lora_straight")
    run(train_cmd(2, *RESUME, *LORA, f"checkpoint.load={base}", f"checkpoint.dir={work / 'run'}"), cwd=work)
    return work / "run"


def test_a_step_holds_adapters_head_optimizer_state_and_the_base_record(straight, base):
    step = straight / f"step-{2 * N}"
    _complete(step, 2 * N)
    weights = read_plain_tensors(step / "model")
    adapters = [k for k in weights if "_adapter.lora_" in k]
    assert sorted(weights) == sorted(adapters + ["score.weight"]) and len(adapters) == 4 * 2
    assert weights["decoder.layers.self_attention.linear_qkv_adapter.lora_a"].shape == (2, 4, 64)  # [L, r, in]
    assert weights["decoder.layers.mlp.linear_fc1_adapter.lora_b"].shape == (2, 256, 4)  # [L, 2 x ffn, r]
    optimizer = read_plain_tensors(step / "optimizer")
    assert optimizer and all(k.split(".", 3)[-1] in weights for k in optimizer), sorted(optimizer)[:3]
    record = json.loads((step / "megarank_checkpoint.json").read_text())["lora_base"]
    assert record["path"] == str(base.resolve()) and len(record["fingerprint"]) == 8


def test_sigkill_then_resume_is_bit_identical(straight, base, tmp_path):
    run_dir = tmp_path / "run"
    args = [*RESUME, *LORA, f"checkpoint.load={base}", f"checkpoint.dir={run_dir}"]
    _sigkill_at(tmp_path, 2, f"step:{N + 2}", *args, f"logging.tensorboard_dir={tmp_path / 'tb-killed'}")
    assert sorted(tb_scalars(tmp_path / "tb-killed", "train/loss")) == list(range(1, N + 2))
    assert _latest(run_dir) == f"step-{N}"
    out = run(train_cmd(2, *args, f"logging.tensorboard_dir={tmp_path / 'tb-resumed'}"), cwd=tmp_path).stdout
    assert f"resumed from {run_dir / f'step-{N}'} at step {N}\n" in out
    assert sorted(log_lines(out)) == list(range(N + 1, 2 * N + 1))
    _assert_same_run(straight, run_dir, tmp_path / "tb-resumed", list(range(N + 1, 2 * N + 1)))


def _resume_error(run_dir, base, cwd) -> str:
    """The one-line error of resuming ``run_dir`` with ``checkpoint.load=base`` (one process: it fails before
    anything is built)."""
    result = run(train_cmd(1, *RESUME, *LORA, f"checkpoint.load={base}", f"checkpoint.dir={run_dir}",
                           f"train.steps={2 * N + 1}"), cwd=cwd, check=False)
    assert result.returncode != 0
    errors = [line for line in result.stdout.splitlines() if "LoRA adapters for the base" in line]
    assert len(errors) == 1, result.stdout[-3000:]
    return errors[0]


def test_another_or_a_changed_base_is_a_one_line_error_naming_both(straight, base, tmp_path):
    other = tmp_path / "other"
    run([sys.executable, "make_init.py", TINY, str(other), "train.seed=8"], cwd=base.parent)
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    error = _resume_error(run_dir, other, tmp_path)
    assert str(base.resolve()) in error and str(other.resolve()) in error and "checkpoint.load" in error

    moved = tmp_path / "base-copy"  # the record names a base whose weights then change
    shutil.copytree(base, moved)
    marker = run_dir / f"step-{2 * N}" / "megarank_checkpoint.json"
    data = json.loads(marker.read_text())
    data["lora_base"]["path"] = str(moved)
    marker.write_text(json.dumps(data))
    (run_dir / f"step-{2 * N}" / "megarank_manifest.json").unlink()  # the edited marker would fail its checksum
    with open(next((moved / "model").glob("*.distcp")), "ab") as f:
        f.write(b"\0")
    error = _resume_error(run_dir, moved, tmp_path)
    assert str(moved) in error and "changed" in error


def _scores_at(step, overrides) -> torch.Tensor:
    from megarank import Reranker

    return Reranker.from_checkpoint(step, dtype="fp32", overrides=overrides).score(PAIRS)


def test_a_lora_step_saved_at_dp2_scores_the_same_at_tp2(straight, one_rank):
    """The adapters (and their base) reshard on load like full weights: TP=2 splits A or B of every adapter. (PP=2
    loads of adapter tensors: tests/test_lora.py.)"""
    step = straight / f"step-{2 * N}"
    ref = _scores_at(step, [])
    for rank, scores in enumerate(run_distributed(_scores_at, 2, str(step), ["parallel.tensor_model_parallel_size=2"])):
        assert (scores - ref).abs().max().item() <= TOL, rank


def test_reranker_and_the_merged_export_score_the_lora_step_like_transformers(straight, base, tmp_path, one_rank):
    from megarank import Reranker
    from tests.test_reranker_api import transformers_scores

    step = straight / f"step-{2 * N}"
    assert convert(["megatron-to-hf", str(step), str(tmp_path / "export"), "--quiet"]) == 0
    lora = Reranker.from_checkpoint(step, dtype="fp32")
    ours = lora.score(PAIRS)
    exported = Reranker.from_checkpoint(tmp_path / "export", dtype="fp32").score(PAIRS)
    theirs = transformers_scores(tmp_path / "export", lora.pair_tokenizer, PAIRS)
    base_scores = Reranker.from_checkpoint(base, dtype="fp32").score(PAIRS)
    assert (ours - base_scores).abs().max().item() > 1e-3, "training changed nothing: the comparison proves nothing"
    assert (exported - ours).abs().max().item() <= TOL, (exported, ours)
    assert (theirs - ours).abs().max().item() <= TOL, (theirs, ours)


def test_a_lora_step_into_a_model_without_adapters_is_a_one_line_error(straight, one_rank):
    from megarank.checkpoint import CheckpointError, load_model_weights
    from megarank.config import load_config
    from megarank.model import build_model

    cfg = load_config(TINY)
    with pytest.raises(CheckpointError, match="holds LoRA adapters only.*export it merged first"):
        load_model_weights(build_model(cfg.model, cfg.parallel), straight / f"step-{2 * N}")


def _peft_scores(base_export, adapter, pair_tokenizer, pairs):
    """PEFT's own loader: the base export under transformers with the adapter folder on it."""
    import peft
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(str(base_export), trust_remote_code=True,
                                                              attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    batch = pair_tokenizer([q for q, _ in pairs], [p for _, p in pairs])
    with torch.no_grad():
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long()).logits[:, 0]
    return scores.float(), model


def test_a_peft_adapter_on_the_base_export_scores_as_the_merged_export(straight, base, tmp_path, one_rank, capsys):
    """`megarank-convert lora-to-peft`: PEFT (`PeftModel.from_pretrained` on the base's export) scores the step as
    megarank does (<= 1e-5, fp32), and PEFT's own merge gives the merged export's weights; a folder that is not the
    base's export, or a step without adapters, is a one-line error and writes nothing."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    from megarank import Reranker
    from tests.test_reranker_api import transformers_scores

    step = straight / f"step-{2 * N}"
    base_hf, merged, adapter = tmp_path / "base-hf", tmp_path / "merged", tmp_path / "adapter"
    assert convert(["megatron-to-hf", str(step), str(merged), "--quiet"]) == 0
    assert convert(["megatron-to-hf", str(base), str(base_hf), "--quiet", "--tokenizer", str(merged)]) == 0
    capsys.readouterr()
    assert convert(["lora-to-peft", str(step), str(adapter), "--base-model", str(base_hf)]) == 0
    assert "lora-to-peft: " in capsys.readouterr().out
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_hf) and config["r"] == 4 and config["lora_alpha"] == 8
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"} and config["modules_to_save"] == ["score"]
    lora = Reranker.from_checkpoint(step, dtype="fp32")
    ours = lora.score(PAIRS)
    theirs, model = _peft_scores(base_hf, adapter, lora.pair_tokenizer, PAIRS)
    base_scores = transformers_scores(base_hf, lora.pair_tokenizer, PAIRS)
    assert (base_scores - ours).abs().max().item() > 1e-3, "the adapter changes nothing: the comparison proves nothing"
    assert (theirs - ours).abs().max().item() <= TOL, (theirs, ours)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. PEFT's "Unexpected keyword arguments" for config keys
        peft.PeftConfig.from_pretrained(str(adapter))
    peft_merged = model.merge_and_unload().state_dict()
    exported = {k: v for f in sorted(merged.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert exported.keys() <= peft_merged.keys()
    worst = max((peft_merged[k].float() - v.float()).abs().max().item() for k, v in exported.items())
    assert worst <= 1e-6, worst

    capsys.readouterr()  # transformers' loading bars
    assert convert(["lora-to-peft", str(step), str(tmp_path / "wrong"), "--base-model", str(merged)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megarank-convert lora-to-peft: error: --base-model") and "differs" in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "wrong").exists()
    assert convert(["lora-to-peft", str(base), str(tmp_path / "full")]) == 2
    assert "holds full weights, not LoRA adapters" in capsys.readouterr().err and not (tmp_path / "full").exists()


def test_the_peft_adapter_loads_through_transformers_and_sentence_transformers(straight, base, tmp_path, one_rank):
    """The two other ways users put an adapter on a model: transformers' ``model.load_adapter`` and
    sentence-transformers' ``CrossEncoder.load_adapter`` on the base export score as the merged export does."""
    pytest.importorskip("peft")
    from sentence_transformers import CrossEncoder
    from transformers import AutoModelForSequenceClassification

    from megarank import Reranker

    step = straight / f"step-{2 * N}"
    base_hf, merged, adapter = tmp_path / "base-hf", tmp_path / "merged", tmp_path / "adapter"
    assert convert(["megatron-to-hf", str(step), str(merged), "--quiet"]) == 0
    assert convert(["megatron-to-hf", str(base), str(base_hf), "--quiet", "--tokenizer", str(merged)]) == 0
    assert convert(["lora-to-peft", str(step), str(adapter), "--base-model", str(base_hf)]) == 0
    batch = Reranker.from_checkpoint(step, dtype="fp32").pair_tokenizer([q for q, _ in PAIRS], [p for _, p in PAIRS])

    def logits(folder, adapter_dir=None):
        model = AutoModelForSequenceClassification.from_pretrained(str(folder), trust_remote_code=True,
                                                                   attn_implementation="eager").eval()
        if adapter_dir is not None:
            model.load_adapter(str(adapter_dir))
        with torch.no_grad():
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long()).logits[:, 0]

    want = logits(merged)
    assert (logits(base_hf) - want).abs().max().item() > 1e-3
    assert (logits(base_hf, adapter) - want).abs().max().item() <= TOL
    st_merged = CrossEncoder(str(merged), trust_remote_code=True).predict(PAIRS, convert_to_tensor=True)
    st_base = CrossEncoder(str(base_hf), trust_remote_code=True)
    st_base.load_adapter(str(adapter))
    got = st_base.predict(PAIRS, convert_to_tensor=True)
    assert (got.float() - st_merged.float()).abs().max().item() <= TOL, (got, st_merged)


def test_a_trained_final_norm_travels_in_the_peft_adapter(base, tmp_path, one_rank):
    """model.lora_train_final_norm: the final norm trains in full, and the adapter carries it (modules_to_save
    ``model.norm``), so PEFT on the base export still scores as the merged export."""
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    from megarank import Reranker
    from tests.test_reranker_api import transformers_scores

    run(train_cmd(1, "train.steps=2", "checkpoint.save_interval=2", *LORA, "model.lora_train_final_norm=true",
                  f"checkpoint.load={base}", f"checkpoint.dir={tmp_path / 'run'}"), cwd=tmp_path)
    step = tmp_path / "run" / "step-2"
    base_hf, merged, adapter = tmp_path / "base-hf", tmp_path / "merged", tmp_path / "adapter"
    assert convert(["megatron-to-hf", str(step), str(merged), "--quiet"]) == 0
    assert convert(["megatron-to-hf", str(base), str(base_hf), "--quiet"]) == 0
    assert convert(["lora-to-peft", str(step), str(adapter), "--base-model", str(base_hf)]) == 0
    assert json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"] == ["score", "model.norm"]
    tokenizer = Reranker.from_checkpoint(step, dtype="fp32").pair_tokenizer
    want = transformers_scores(merged, tokenizer, PAIRS)
    got, model = _peft_scores(base_hf, adapter, tokenizer, PAIRS)
    assert (got - want).abs().max().item() <= TOL, (got, want)
    norm = model.merge_and_unload().state_dict()["model.norm.weight"]
    base_norm = {k: v for f in base_hf.glob("*.safetensors") for k, v in load_file(str(f)).items()}["model.norm.weight"]
    assert not torch.equal(norm, base_norm), "the final norm did not train: the test proves nothing"
