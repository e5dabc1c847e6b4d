"""megarank checkpoints, one package (the format and its guarantees: docs/checkpoints.md).

| module | job |
|---|---|
| ``layout``      | the on-disk format stated once: folder and file names, the marker, the format version (also used by ``checkpoint_tools``) |
| ``integrity``   | the CRC-32 manifest written at save and checked at every load; finite-weights check |
| ``safe_pickle`` | every pickle a load reads through an allow-list (a checkpoint never runs code it carries); the torch_dist load |
| ``weights``     | model weights (+ FP8 ``_extra_state``) saved / loaded at any TP/PP; architecture and shape checks; the saved config |
| ``run_folder``  | ``step-N`` folders, the atomic ``latest``, fall-back to the newest intact step, prune, incomplete saves |
| ``lock``        | one live run per run folder (``flock``) |
| ``writer``      | megatron-core's torch_dist writer kept inside the trainer process |
| ``train_state`` | a training step's checkpoint: weights + the optimizer state handed in + per-rank train state and RNG |
| ``manager``     | ``RunCheckpoints``, the one object the training loop holds |

It imports nothing from ``megarank.training``: the trainer hands its optimizer state in (``OptimizerState``).
"""
from megarank.checkpoint.integrity import check_finite, verify_checkpoint_files, write_manifest
from megarank.checkpoint.layout import (
    EXTRA_DIR, FORMAT_VERSION, MANIFEST, MARKER, MODEL_DIR, MODEL_PARTS, OPTIMIZER_DIR, STATE_DIR, CheckpointError,
    read_marker, step_dir_name, write_marker,
)
from megarank.checkpoint.manager import RunCheckpoints
from megarank.checkpoint.run_folder import latest_checkpoint, prune_old, publish_latest, remove_incomplete, resolve_checkpoint
from megarank.checkpoint.train_state import (
    OptimizerState, current_layout, layout_change, load_rng_state, load_train_state, load_training_checkpoint,
    save_rng_state, save_training_checkpoint,
)
from megarank.checkpoint.weights import (
    ARCHITECTURE_KEYS, check_architecture, load_checkpoint_config, load_model_weights, save_model_weights,
)

__all__ = [
    "ARCHITECTURE_KEYS", "EXTRA_DIR", "FORMAT_VERSION", "MANIFEST", "MARKER", "MODEL_DIR", "MODEL_PARTS", "OPTIMIZER_DIR",
    "STATE_DIR", "CheckpointError", "OptimizerState", "RunCheckpoints", "check_architecture", "check_finite",
    "current_layout", "latest_checkpoint", "layout_change", "load_checkpoint_config", "load_model_weights",
    "load_rng_state", "load_train_state", "load_training_checkpoint", "prune_old", "publish_latest", "read_marker",
    "remove_incomplete", "resolve_checkpoint", "save_model_weights", "save_rng_state", "save_training_checkpoint",
    "step_dir_name", "verify_checkpoint_files", "write_manifest", "write_marker",
]
