"""Reranker losses over query groups (rows group-major: each group's positive first, then its negatives)."""
import torch
import torch.nn.functional as F


def group_scores(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """scores [G*n] or [G*n, 1] -> [G, n]."""
    return scores.reshape(-1, group_size).float()


def listwise_loss(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Softmax cross-entropy over each group with the positive (index 0) as target; mean over groups."""
    logits = group_scores(scores, group_size)
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target)


def pointwise_loss(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Binary cross-entropy per pair: 1 for each group's positive, 0 for its negatives; mean over pairs."""
    logits = group_scores(scores, group_size)
    labels = torch.zeros_like(logits)
    labels[:, 0] = 1.0
    return F.binary_cross_entropy_with_logits(logits, labels)


LOSSES = {"listwise": listwise_loss, "pointwise": pointwise_loss}


@torch.no_grad()
def group_metrics(scores: torch.Tensor, group_size: int) -> dict:
    """Accuracy@1 (positive ranked first, ties count against) and the mean reciprocal rank of the positive."""
    logits = group_scores(scores, group_size)
    pos = logits[:, :1]
    rank = 1 + (logits[:, 1:] >= pos).sum(dim=1).float()  # a tie with a negative ranks the positive lower
    return {"acc": (rank == 1).float().mean(), "mrr": (1.0 / rank).mean()}
