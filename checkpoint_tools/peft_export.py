"""lora-to-peft: a LoRA training step -> a PEFT adapter folder (``adapter_config.json``, ``adapter_model.safetensors``)
for users who keep one base export and many adapters.

The adapters are written on the Hugging Face module names of the exported reranker (keymap.py), in PEFT's own key
spelling (``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``, as ``PeftModel.save_pretrained`` writes
them). megatron fuses q/k/v into ``linear_qkv`` and gate/up into ``linear_fc1``; one adapter on a fused linear is
``B @ A`` with ``B``'s rows in the fused order, so it becomes one adapter per HF projection with the same ``A`` and
``B``'s rows for that projection (split exactly as the base weight is split on export): ``W_q + s * B_q @ A`` is the
merged export's ``q_proj`` row for row. The scaling is PEFT's ``lora_alpha / r``, megarank's. The trained score head
(temperature folded in, as every export) and, with ``model.lora_train_final_norm``, the final norm are PEFT
``modules_to_save``: they replace the base's when the adapter is loaded.

``--base-model`` names the HF export of the checkpoint's base (``megarank-convert megatron-to-hf BASE ...``): it is
checked against the base this step was trained on (architecture, pooling, and the first layer's and the final
norm's weights) and written as ``base_model_name_or_path``. Loading::

    base = AutoModelForSequenceClassification.from_pretrained(BASE_EXPORT, trust_remote_code=True)
    model = peft.PeftModel.from_pretrained(base, ADAPTER)   # scores = the merged export's
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from checkpoint_tools import keymap
from checkpoint_tools.atomic import atomic_output_dir, check_destination
from checkpoint_tools.configs import load_saved_config
from checkpoint_tools.errors import ConversionError
from checkpoint_tools.export_hf import export_dims
from checkpoint_tools.lora_reader import MergedLoRAWeights, is_lora_checkpoint
from checkpoint_tools.megatron_reader import resolve_checkpoint

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_CONFIG_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "intermediate_size", "vocab_size")


def _layer_mapping(target: str) -> keymap.Mapping:
    from megarank.model.adapters import TARGETS

    parent, _ = TARGETS[target]
    key = f"decoder.layers.{parent}.{target}.weight"
    return next(mp for mp in keymap.LAYER_MAPPINGS if mp.megatron == key)


def hf_modules(targets) -> list[str]:
    """PEFT ``target_modules``: the HF projections the megatron targets stand for (``linear_qkv`` -> q/k/v_proj)."""
    return [name.split(".")[-2] for t in targets for name in _layer_mapping(t).hf]


def adapter_tensors(weights: MergedLoRAWeights, dims: keymap.Dims, targets, train_final_norm: bool):
    """(PEFT key, tensor) of every adapter of every layer, then the head (and the final norm)."""
    from megarank.model.adapters import TARGETS, adapter_name

    for i in range(dims.layers):
        adapters = weights.read_adapters(i)
        for target in targets:
            parent, _ = TARGETS[target]
            a = adapters[f"decoder.layers.{parent}.{adapter_name(target)}.lora_a"]
            b = adapters[f"decoder.layers.{parent}.{adapter_name(target)}.lora_b"]
            for name, b_rows in _layer_mapping(target).to_hf(b, dims, i).items():  # B's rows split as W's are
                module = PEFT_PREFIX + name.removesuffix(".weight")
                yield f"{module}.lora_A.weight", a.clone()  # one copy per projection: safetensors stores no aliases
                yield f"{module}.lora_B.weight", b_rows.contiguous()
    extra = [keymap.SCORE] + ([keymap.FINAL_NORM] if train_final_norm else [])
    for mp in extra:
        for name, t in mp.to_hf(weights.read_global(mp.megatron), dims).items():
            yield PEFT_PREFIX + name, t.contiguous()


def check_base_export(base_dir: Path, weights: MergedLoRAWeights, dims: keymap.Dims, m) -> None:
    """``base_dir`` must be the HF export of this step's base: same architecture and pooling, and the same first
    layer and final norm (compared in the export's dtype)."""
    from safetensors import safe_open

    cfg_path = base_dir / "config.json"
    if not cfg_path.is_file():
        raise ConversionError(f"--base-model {base_dir} has no config.json (export the base with megarank-convert "
                              "megatron-to-hf first)")
    cfg = json.loads(cfg_path.read_text())
    expected = {"hidden_size": m.hidden_size, "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_attention_heads,
                "num_key_value_heads": m.num_query_groups, "intermediate_size": m.ffn_hidden_size,
                "vocab_size": dims.vocab}
    for key in BASE_CONFIG_KEYS:
        if cfg.get(key) != expected[key]:
            raise ConversionError(f"--base-model {cfg_path} has {key} = {cfg.get(key)} but the LoRA checkpoint's base "
                                  f"has {expected[key]}")
    if cfg.get("pooling") != m.pooling:
        raise ConversionError(f"--base-model {cfg_path} pools '{cfg.get('pooling')}' but the adapters were trained "
                              f"with model.pooling = {m.pooling}; the adapter would not score as trained")
    files = sorted(base_dir.glob("*.safetensors"))
    where = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            where.update({k: f for k in sf.keys()})
    layer0 = weights.base.read_layer(0)
    expected_tensors = {}
    for mp in keymap.LAYER_MAPPINGS:
        expected_tensors.update(mp.to_hf(layer0[mp.megatron], dims, 0))
    expected_tensors.update(keymap.FINAL_NORM.to_hf(weights.base.read_global(keymap.FINAL_NORM.megatron), dims))
    for name, want in expected_tensors.items():
        if name not in where:
            raise ConversionError(f"--base-model {base_dir} has no tensor {name}")
        with safe_open(str(where[name]), framework="pt") as sf:
            got = sf.get_tensor(name)
        if got.shape != want.shape or not torch.equal(got, want.to(got.dtype)):
            raise ConversionError(f"--base-model {base_dir} is not the export of this checkpoint's base "
                                  f"{weights.base_dir}: {name} differs")


def lora_to_peft(src, dst, *, base_model=None, overwrite: bool = False) -> str:
    """Write the PEFT adapter of LoRA step ``src`` to ``dst``; returns the summary line."""
    from safetensors.torch import save_file

    ckpt = resolve_checkpoint(src)
    if not is_lora_checkpoint(ckpt):
        raise ConversionError(f"{ckpt} holds full weights, not LoRA adapters (model.lora_rank was 0): export it with "
                              "megatron-to-hf")
    cfg = load_saved_config(ckpt)
    m = cfg.model
    dst = check_destination(ckpt, dst, overwrite)
    weights = MergedLoRAWeights(ckpt, m)
    weights.check_against(m)
    dims = export_dims(m, weights)
    base_dir = None
    if base_model is not None:
        base_dir = Path(base_model).absolute()
        check_base_export(base_dir, weights, dims, m)
    targets = list(m.lora_targets)
    tensors = dict(adapter_tensors(weights, dims, targets, m.lora_train_final_norm))
    config = {
        "peft_type": "LORA", "task_type": "SEQ_CLS", "base_model_name_or_path": str(base_dir) if base_dir else None,
        "r": m.lora_rank, "lora_alpha": m.lora_alpha, "lora_dropout": m.lora_dropout, "bias": "none",
        "target_modules": hf_modules(targets), "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": ["score"] + (["model.norm"] if m.lora_train_final_norm else []),
    }
    # Where it came from goes in the safetensors header: PEFT warns about any adapter_config.json key it lacks.
    metadata = {"format": "pt", "megarank_source": str(ckpt), "megarank_base": str(weights.base_dir)}
    with atomic_output_dir(dst) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata=metadata)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    base_note = f"base {base_dir}" if base_dir else "no --base-model: set base_model_name_or_path or pass the base yourself"
    return (f"lora-to-peft: {len(tensors)} tensors ({size / 1e6:.1f} MB), r={m.lora_rank} on "
            f"{', '.join(config['target_modules'])} + {', '.join(config['modules_to_save'])} -> {dst} "
            f"(from {ckpt}; {base_note})")
