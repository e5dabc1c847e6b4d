"""fp32 that stays fp32 for ``verify``: it compares fp32 scores at 1e-4, and TF32 keeps 10 mantissa bits (~1e-3).

NGC PyTorch images export TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1, which beats ``torch.backends.cuda.matmul.allow_tf32 =
False``, and torch reads it once, at import: with torch 2.13, ``TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 python -c "import
os, torch; os.environ['TORCH_ALLOW_TF32_CUBLAS_OVERRIDE'] = '0'; print(torch.backends.cuda.matmul.allow_tf32)"``
prints True. So the verify command clears it before anything imports torch (this module imports nothing heavy).
"""
from __future__ import annotations

import os
from typing import MutableMapping

TF32_OVERRIDE = "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"


def tf32_override_set(env: MutableMapping[str, str] = os.environ) -> bool:
    return env.get(TF32_OVERRIDE, "").strip().lower() not in ("", "0", "false", "off", "no")


def clear_tf32_override(env: MutableMapping[str, str] = os.environ) -> bool:
    """Set the override to 0 (before torch is imported); True if it was on."""
    if not tf32_override_set(env):
        return False
    env[TF32_OVERRIDE] = "0"
    return True
