"""The megarank configs a conversion reads besides config.json, shared by import, export and verify: the requested
config (``--config`` YAML and dotted overrides), a checkpoint's saved config.yaml, their agreement on the
architecture, and the ``--dtype`` names."""
from __future__ import annotations

from pathlib import Path

import torch

from checkpoint_tools.errors import ConversionError
from checkpoint_tools.hf_config import HF_ARCHITECTURE_KEYS, normalized_architecture
from megarank.config import TORCH_DTYPE_NAMES, torch_dtype

DTYPES = {name: torch_dtype(name) for name in TORCH_DTYPE_NAMES}  # megarank.config's one dtype map


def dtype_name(dtype: torch.dtype) -> str:
    """The megarank name (``model.dtype``, ``--dtype``) of a torch dtype."""
    return {v: k for k, v in DTYPES.items()}[dtype]


def keys_in_overrides(overrides, section: str = "model") -> set:
    """The ``<section>.<key>`` names that dotted ``section.key=value`` overrides set."""
    keys = set()
    for item in overrides:
        parts = item.split("=", 1)[0].strip().split(".")
        if len(parts) > 1 and parts[0] == section:
            keys.add(parts[1])
    return keys


def _keys_in_yaml(path, section: str) -> set:
    import yaml

    raw = (yaml.safe_load(Path(path).read_text()) or {}) if path is not None else {}
    return set((raw.get(section) or {}).keys())


def explicit_keys(path=None, overrides=(), section: str = "model") -> set:
    """The ``section`` keys a ``--config`` YAML and dotted overrides set explicitly."""
    return _keys_in_yaml(path, section) | keys_in_overrides(overrides, section)


def load_requested_config(path=None, overrides=()):
    """The megarank Config to start from (``path``'s YAML, or the defaults, then the dotted ``overrides`` as
    ``megarank.config.load_config`` applies them), and the model keys those set explicitly."""
    from megarank.config import ConfigError, load_config

    try:
        cfg = load_config(None if path is None else str(path), list(overrides))
    except ConfigError as e:
        raise ConversionError(str(e)) from None
    return cfg, explicit_keys(path, overrides)


def load_saved_config(ckpt: Path):
    """A checkpoint's config.yaml as a Config (megarank.checkpoint.load_checkpoint_config)."""
    from megarank.checkpoint import load_checkpoint_config
    from megarank.checkpoint.layout import CONFIG_FILE
    from megarank.config import ConfigError

    try:
        return load_checkpoint_config(ckpt)
    except ConfigError as e:
        raise ConversionError(f"{ckpt}/{CONFIG_FILE} is not a valid megarank config: {e}") from None


def check_agreement(want, have, keys, want_name: str, have_name: str) -> None:
    """The HF_ARCHITECTURE_KEYS in ``keys`` must agree between two configs (ModelConfig or HF-derived dict); the
    error names the first that differs, with both values."""
    want, have = normalized_architecture(want), normalized_architecture(have)
    for key in HF_ARCHITECTURE_KEYS:
        if key in keys and want[key] != have[key]:
            raise ConversionError(
                f"{want_name} has model.{key} = {want[key]} but {have_name} has {have[key]}; "
                "the requested config contradicts the checkpoint"
            )
