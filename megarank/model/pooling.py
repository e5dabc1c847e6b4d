"""Pool token states into one vector per sequence, over valid (non-padding) tokens only."""
import torch

POOLING_MODES = ("avg", "last", "cls")


def pool(hidden: torch.Tensor, valid: torch.Tensor, mode: str) -> torch.Tensor:
    """hidden [b, s, h], valid [b, s] bool (True = real token, right padding) -> [b, h]."""
    if mode == "avg":
        mask = valid.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if mode == "last":
        last = valid.long().sum(1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if mode == "cls":
        return hidden[:, 0]
    raise ValueError(f"unknown pooling {mode!r}; expected one of {POOLING_MODES}")
