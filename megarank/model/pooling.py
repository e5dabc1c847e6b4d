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


def pool_packed(hidden: torch.Tensor, seqlens, num_sequences: int, mode: str) -> torch.Tensor:
    """hidden [t, h] of a packed stream, segment lengths ``seqlens`` (host ints) -> [num_sequences, h].

    Only the first ``num_sequences`` segments are pooled (a trailing padding segment is ignored), so the same
    sequences give the same vectors as ``pool`` on the padded batch.
    """
    lengths = list(seqlens[:num_sequences])
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    if mode == "avg":
        real = hidden[: sum(lengths)]
        segment = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device),
                                          torch.tensor(lengths, device=hidden.device))
        sums = hidden.new_zeros(len(lengths), hidden.shape[1]).index_add(0, segment, real)
        return sums / torch.tensor(lengths, device=hidden.device, dtype=hidden.dtype)[:, None]
    if mode == "last":
        return hidden[torch.tensor([s + n - 1 for s, n in zip(starts, lengths)], device=hidden.device)]
    if mode == "cls":
        return hidden[torch.tensor(starts, device=hidden.device)]
    raise ValueError(f"unknown pooling {mode!r}; expected one of {POOLING_MODES}")
