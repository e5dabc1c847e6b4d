"""Reranker losses over query groups.

Rows are group-major: a micro-batch holds G query groups of n passages each; the model's scores come as [G*n] or
[G*n, 1] and are reshaped to the [G, n] of ``relevance`` (graded labels: > 0 positive, 0 negative; every group has
at least one positive and its positives come first). ``teacher`` ([G, n], optional) holds a teacher's logits.

Every loss returns the scalar MEAN OVER GROUPS (the training step weights micro-batches assuming that). Where an
anchor implementation reduces differently (over all pairs of the batch), the difference is stated at the loss and we
reduce per group first. The computation runs in float32 at least: bf16/fp16/fp32 scores -> float32;
float64 scores stay float64, which lets the tests check values and gradients to 1e-10.

Anchors (the code each loss follows; line numbers of these versions):
  sentence-transformers 6.3.0 (ST), ``sentence_transformers/cross_encoder/losses/``;
  Tevatron (texttron/tevatron @ dd063104), ``src/tevatron/megatron/``;
  FlagEmbedding (FlagOpen/FlagEmbedding @ 7ed43d67), ``FlagEmbedding/abc/finetune/reranker/``.

========== =====================================================================================================
listwise   softmax cross-entropy per group. One positive: ``F.cross_entropy(logits, index of the positive)``, exactly
           as before (Tevatron megatron/loss.py:16-18). Several positives: soft target uniform over the positives,
           ``-sum_i q_i log softmax(s)_i`` with ``q_i = [rel_i > 0] / #positives``.
pointwise  ``BCE-with-logits(s_i, [rel_i > 0])``, mean over all pairs (= mean over groups of the group means).
kl         ``KL(p_t || p_s)``, p_t = softmax(teacher / T), p_s = softmax(scores), T = ``teacher_temperature``; sum
           over the group, mean over groups ("batchmean"), no T**2 factor. Tevatron's Megatron reranker
           (megatron/engine.py:366-376, config.py:148-156) divides the teacher by ``teacher_temp`` and the student
           by a separate ``student_temp`` and multiplies by ``student_temp ** 2``; we have no student temperature
           (= Tevatron with student_temp = 1, so its factor is 1). FlagEmbedding (abc/finetune/reranker/
           AbsModeling.py:79-91; teacher logits from the data's pos_scores/neg_scores, AbsDataset.py:155-159) uses
           the soft-label CE ``-sum p_t log p_s`` with p_t = softmax(teacher) (no temperature) and ADDS it to the
           hard CE (loss = CE + soft CE, our distill_weight = 0.5 up to a factor 2 and the constant entropy). KL and
           the soft-label CE differ by the teacher's entropy, a constant: same gradients.
margin_mse ST MarginMSELoss (margin_mse.py:123, 144-145; activation Identity, margin_mse.py:11): MSE between the
           student margins ``s_0 - s_j`` and the teacher margins ``t_0 - t_j`` for j = 1..n-1 (passage 0 is a
           positive; other positives count as "negatives" too, as in ST); ``nn.MSELoss`` mean over the G*(n-1)
           margins = mean over groups of the mean over the group's n-1 margins.
mse        ST MSELoss (mse.py:10, 108): ``nn.MSELoss`` between student and teacher logits, default activation
           ``nn.Identity()`` (so raw logits), mean over the G*n pairs = mean over groups of the group means.
listnet    ST ListNetLoss (list_net.py:93, 173): ``CE(softmax(relevance), softmax(scores))`` per group (the
           target distribution is the softmax of the raw graded labels, no temperature), mean over groups. ST pads
           ragged groups (logits -1e16, labels -inf); our groups are full, so no padding.
plistmle   ST PListMLELoss with its default ``PListMLELambdaWeight()`` (plist_mle.py:40-45, 53, 255-276): the
           Plackett-Luce log-likelihood of the ranking by relevance, position r (1-based) weighted by
           ``2**(n - r) - 1`` normalised to sum 1 (+ eps 1e-10, plist_mle.py:160, 265), negated, mean over groups.
           The target ranking sorts the group by relevance, descending, with a STABLE sort: tied labels keep their
           input order. ST's default ``respect_input_order=True`` (plist_mle.py:56) takes the input order as the
           ranking: identical when the group is sorted by relevance (e.g. [2, 1, 0, 0, 0]); ST's
           ``respect_input_order=False`` sorts with an unstable sort (plist_mle.py:247), identical up to ties.
lambda     LambdaLoss (Wang et al., CIKM 2018) as ST LambdaLoss's defaults (lambda_loss.py:104-332): weighting
           NDCG-Loss2++ with mu = 10 (lambda_loss.py:92-101), sigma = 1, eps = 1e-10 (clamps maxDCG), k = None (all
           positions), reduction_log="binary" (log2: the log-sigmoid is divided by ln 2, lambda_loss.py:327). Docs are
           ranked by the student's scores (stable sort: ties keep input order; ST's sort is unstable), gains
           ``(2**rel - 1) / maxDCG``, discounts ``D(r) = log2(1 + r)``; for each pair of ranks (i, j) with
           rel_i > rel_j: ``-w_ij log2 sigmoid(sigma (s_i - s_j))``, w_ij = |G_i - G_j| * (mu |1/D(|i-j|) -
           1/D(|i-j|+1)| + |1/D(i) - 1/D(j)|). ST divides the sum over ALL valid pairs of the batch by their number
           (lambda_loss.py:330-331); we take each group's mean over its valid pairs, then the mean over groups.
           The two agree when every group has as many valid pairs (e.g. the same labels); with different label
           profiles ST weights groups by their pair counts.
ranknet    ST RankNetLoss (rank_net.py:96: LambdaLoss with NoWeightingScheme): ``-log2 sigmoid(s_i - s_j)`` (base 2:
           reduction_log="binary" by default, rank_net.py:18) over the pairs rel_i > rel_j; the group's mean over
           its pairs, then the mean over groups (ST: the batch's mean over all its pairs, as for lambda).
========== =====================================================================================================

Distillation mix (kl, margin_mse, mse): ``distill_weight * distill + (1 - distill_weight) * listwise`` (hard labels).
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_NAMES = ("listwise", "pointwise", "kl", "margin_mse", "mse", "listnet", "plistmle", "lambda", "ranknet")
NEEDS_TEACHER = frozenset({"kl", "margin_mse", "mse"})

# ST LambdaLoss / NDCGLoss2PPScheme / PListMLELoss defaults (sentence-transformers 6.3.0).
_LAMBDA_MU, _LAMBDA_SIGMA, _LAMBDA_EPS = 10.0, 1.0, 1e-10
_PLISTMLE_EPS = 1e-10


def _compute_dtype(t: Tensor) -> torch.dtype:
    """float32 at least: half types go up to float32, float64 stays."""
    return torch.promote_types(t.dtype, torch.float32)


def _grouped(scores: Tensor, relevance: Tensor, teacher: Tensor | None):
    """-> (scores [G, n], relevance [G, n], teacher [G, n] or None), all in the compute dtype."""
    if relevance.dim() != 2:
        raise ValueError(f"relevance must be [groups, passages], got shape {tuple(relevance.shape)}")
    if scores.numel() != relevance.numel():
        raise ValueError(f"{scores.numel()} scores for {relevance.shape[0]} groups of {relevance.shape[1]} passages "
                         f"(relevance {tuple(relevance.shape)})")
    dtype = _compute_dtype(scores)
    s = scores.reshape(relevance.shape).to(dtype)
    rel = relevance.to(device=s.device, dtype=dtype)
    if teacher is not None:
        if teacher.numel() != relevance.numel():
            raise ValueError(f"teacher has shape {tuple(teacher.shape)}, relevance {tuple(relevance.shape)}")
        teacher = teacher.detach().reshape(relevance.shape).to(device=s.device, dtype=dtype)
    return s, rel, teacher


def _listwise(s: Tensor, rel: Tensor) -> Tensor:
    """Softmax CE per group against the uniform distribution over its positives; mean over groups.

    Written as CE(first positive) + mean_g(sum_i (onehot_first - q)_i s_i), since the soft-target CE is
    logsumexp(s) - sum_i q_i s_i. With one positive the coefficients (onehot_first - q) are exactly 0, so the
    correction adds exact zeros to the value and to the gradient: the loss is bit for bit today's
    ``F.cross_entropy(logits, 0)``, without a host sync to tell the cases apart."""
    pos = (rel > 0).to(s.dtype)
    first = pos.argmax(dim=1)  # the first maximal value: the group's first positive
    ce = F.cross_entropy(s, first)
    q = pos / pos.sum(dim=1, keepdim=True)
    coef = F.one_hot(first, s.shape[1]).to(s.dtype) - q
    return ce + (coef * s).sum(dim=1).mean()


def _pointwise(s: Tensor, rel: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(s, (rel > 0).to(s.dtype))


def _kl(s: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    # Tevatron megatron/engine.py:368-376 with student_temp = 1.
    return F.kl_div(F.log_softmax(s, dim=-1), F.softmax(teacher / temperature, dim=-1), reduction="batchmean")


def _margin_mse(s: Tensor, teacher: Tensor) -> Tensor:
    return F.mse_loss(s[:, :1] - s[:, 1:], teacher[:, :1] - teacher[:, 1:])


def _mse(s: Tensor, teacher: Tensor) -> Tensor:
    return F.mse_loss(s, teacher)


def _listnet(s: Tensor, rel: Tensor) -> Tensor:
    return F.cross_entropy(s, rel.softmax(dim=1))


def _plistmle(s: Tensor, rel: Tensor) -> Tensor:
    n = s.shape[1]
    order = rel.sort(dim=1, descending=True, stable=True).indices
    ranked = s.gather(1, order)
    log_norm = torch.logcumsumexp(ranked.flip(1), dim=1).flip(1)  # log sum_{k >= r} exp(s_k)
    log_probs = ranked - log_norm
    # ST PListMLELambdaWeight default: 2^(n - r) - 1, rescaled by 2^-(n - 127) beyond 127 documents.
    ranks = torch.arange(1, n + 1, device=s.device, dtype=s.dtype)
    scale = max(n - 127, 0)
    w = torch.pow(2.0, n - ranks - scale) - 2.0 ** -scale
    w = w / (w.sum() + _PLISTMLE_EPS)
    return -(log_probs * w).sum(dim=1).mean()


def _pairwise(s: Tensor, rel: Tensor, weighted: bool) -> Tensor:
    """LambdaLoss (weighted: NDCG-Loss2++) or RankNet (unweighted), log base 2, per-group pair mean, mean over groups."""
    n = s.shape[1]
    s_ranked, order = s.sort(dim=1, descending=True, stable=True)  # the student's ranking (the sort has no gradient)
    y = rel.gather(1, order)  # labels in that order
    valid = y[:, :, None] > y[:, None, :]  # pairs (rank i, rank j) with rel_i > rel_j
    logsig = F.logsigmoid(_LAMBDA_SIGMA * (s_ranked[:, :, None] - s_ranked[:, None, :]))
    if weighted:
        pos = torch.arange(1, n + 1, device=s.device, dtype=s.dtype)
        discount = torch.log2(1.0 + pos)  # D(r), r = 1..n
        ideal = rel.sort(dim=1, descending=True).values
        max_dcg = ((torch.pow(2.0, ideal) - 1.0) / discount).sum(dim=1).clamp(min=_LAMBDA_EPS)
        gain = (torch.pow(2.0, y) - 1.0) / max_dcg[:, None]
        gain_diff = (gain[:, :, None] - gain[:, None, :]).abs()
        # NDCG-Loss2: |1/D(|i-j|) - 1/D(|i-j|+1)|, 0 on the diagonal
        dist = (pos[:, None] - pos[None, :]).abs()
        off = dist > 0
        d = dist.clamp(min=1.0)
        delta = torch.where(off, (1.0 / torch.log2(1.0 + d) - 1.0 / torch.log2(2.0 + d)).abs(), 0.0)
        # LambdaRank: |1/D(i) - 1/D(j)|
        lambda_rank = (1.0 / discount[:, None] - 1.0 / discount[None, :]).abs()
        weights = (_LAMBDA_MU * delta + lambda_rank)[None] * gain_diff
        logsig = weights * logsig
    per_pair = torch.where(valid, -logsig / math.log(2.0), 0.0)
    count = valid.sum(dim=(1, 2)).clamp(min=1).to(s.dtype)
    return (per_pair.sum(dim=(1, 2)) / count).mean()


def group_loss(name: str, scores: Tensor, relevance: Tensor, teacher: Tensor | None = None, *,
               teacher_temperature: float = 1.0, distill_weight: float = 1.0) -> Tensor:
    """The ``name`` loss of a micro-batch: the scalar mean over its G groups (formulas and sources: module docstring).

    scores: [G*n] or [G*n, 1] (any float dtype; computed in float32, float64 kept); relevance: [G, n] graded labels
    (> 0 positive, positives first, at least one per group); teacher: [G, n] teacher logits, required by
    ``NEEDS_TEACHER``; teacher_temperature: kl only, > 0; distill_weight in [0, 1]: teacher losses only,
    ``w * distill + (1 - w) * listwise``."""
    if name not in LOSS_NAMES:
        raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSS_NAMES)}")
    if name in NEEDS_TEACHER and teacher is None:
        raise ValueError(f"loss {name!r} distils from a teacher: it needs teacher logits, got teacher=None")
    if not 0.0 <= distill_weight <= 1.0:
        raise ValueError(f"distill_weight must be in [0, 1], got {distill_weight}")
    if not teacher_temperature > 0.0:
        raise ValueError(f"teacher_temperature must be > 0, got {teacher_temperature}")
    s, rel, teacher = _grouped(scores, relevance, teacher if name in NEEDS_TEACHER else None)

    if name == "listwise":
        return _listwise(s, rel)
    if name == "pointwise":
        return _pointwise(s, rel)
    if name == "listnet":
        return _listnet(s, rel)
    if name == "plistmle":
        return _plistmle(s, rel)
    if name in ("lambda", "ranknet"):
        return _pairwise(s, rel, weighted=name == "lambda")

    if distill_weight == 0.0:
        return _listwise(s, rel)
    if name == "kl":
        distill = _kl(s, teacher, teacher_temperature)
    elif name == "margin_mse":
        distill = _margin_mse(s, teacher)
    else:
        distill = _mse(s, teacher)
    if distill_weight == 1.0:
        return distill
    return distill_weight * distill + (1.0 - distill_weight) * _listwise(s, rel)


@torch.no_grad()
def group_metrics(scores: Tensor, relevance: Tensor) -> dict:
    """{"acc": fraction of groups whose top-scored passage is a positive, "mrr": mean reciprocal rank of the group's
    best-ranked positive}. A negative scored as high as the best positive ranks above it (ties count against), so
    with one positive at index 0 these are the former accuracy@1 and MRR of the positive."""
    rank = positive_ranks(scores, relevance)
    return {"acc": (rank == 1).float().mean(), "mrr": (1.0 / rank).mean()}


@torch.no_grad()
def positive_ranks(scores: Tensor, relevance: Tensor) -> Tensor:
    """[G] float32: the rank of each group's best-ranked positive (1 = top; a negative scored as high ranks above
    it). ``group_metrics`` is the mean of ``rank == 1`` (acc) and of ``1 / rank`` (mrr)."""
    s, rel, _ = _grouped(scores.detach(), relevance, None)
    pos = rel > 0
    best = s.masked_fill(~pos, float("-inf")).amax(dim=1, keepdim=True)
    return 1 + ((s >= best) & ~pos).sum(dim=1).to(torch.float32)


@torch.no_grad()
def per_group_losses(loss_fn, scores: Tensor, relevance: Tensor, teacher: Tensor | None = None) -> Tensor:
    """[G] float64, no gradient: ``loss_fn(scores, relevance, teacher)`` (a mean over groups, e.g. a
    ``group_loss`` partial) of each group alone. Every loss here is the mean over groups of a per-group value, so
    the mean of these is ``loss_fn`` over all the groups, up to rounding; the trained loss is computed as before,
    these are only read (per-source training loss, validation)."""
    s = scores.detach().reshape(relevance.shape)
    return torch.stack([loss_fn(s[g], relevance[g : g + 1], None if teacher is None else teacher[g : g + 1])
                        .detach().double() for g in range(relevance.shape[0])])
